"""The trainer's error types. A :class:`UserError` is a mistake the user can fix (a bad config value, a
run folder that must not be touched, a checkpoint that does not fit): the CLI prints its message as one
line, ``slim-rl: error: ...``, and exits with code 2. A :class:`TrainingError` is a run that cannot go on
(e.g. it diverged): one line, exit code 1. Anything else is a bug and keeps its traceback. This module
imports nothing heavy, so the CLI reports user errors without loading torch."""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "RunFolderError", "CheckpointError", "TrainingError"]


class UserError(ValueError):
    """A mistake the user can fix; the message names what is wrong and what is expected."""


class ConfigError(UserError):
    """A bad configuration: unknown key, wrong type, value out of range, missing file."""


class RunFolderError(UserError):
    """A run folder the command must not touch, or cannot resume."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: damaged, incomplete, or not matching the model."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite updates); the message says why."""


class PeerFailure(TrainingError):
    """A collective timed out or lost a peer (another rank died or stalls). Raised on every rank still alive,
    each of which reports it (the failing rank is not necessarily rank 0)."""

    every_rank = True
