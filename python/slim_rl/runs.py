"""Run folders and the cheap (torch-free) view of their checkpoints, so the command line can decide
whether a run may start before loading torch.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_XXXXXXXX/``, ``summary.json``
and plots. It never loses work (:func:`check_run_folder`): a new run refuses a folder that holds an
earlier run unless ``resume`` or ``overwrite`` is asked for; ``resume`` needs a committed checkpoint; and
with ``overwrite`` the earlier run's files are removed (:func:`clear_run_files`) only once the new run
has something of its own to write. A checkpoint is *committed* when its ``manifest.json`` (written last)
lists files whose sizes all match; the full SHA-256 check happens when it is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from slim_rl.errors import RunFolderError

__all__ = ["RUN_FILES", "check_run_folder", "clear_run_files", "list_checkpoints", "latest_checkpoint",
           "checkpoint_step", "step_dirs"]

PREFIX = "step_"
MANIFEST = "manifest.json"

# what a run writes into its folder (the only names clear_run_files ever removes)
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "accuracy_before.json", "config.yaml", "tb",
             "reward_accuracy.png", "ewc_commits.png")


def _manifest(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            m = json.load(f)
        if not isinstance(m.get("files"), dict) or not m["files"]:
            return None
        return m
    except (OSError, ValueError, AttributeError):
        return None


def _is_complete(path: str) -> bool:
    """The commit marker is there and every file it lists has its recorded size (cheap check)."""
    m = _manifest(path)
    if m is None:
        return False
    try:
        return all(os.path.getsize(os.path.join(path, n)) == meta["bytes"] for n, meta in m["files"].items())
    except (OSError, KeyError, TypeError):
        return False


def step_dirs(directory: str) -> list[str]:
    """Every ``step_XXXXXXXX`` directory (committed or not), oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit())
    return [os.path.join(directory, n) for n in names]


def list_checkpoints(directory: str) -> list[str]:
    """Committed checkpoints under ``directory``, oldest first (``.tmp`` and incomplete ones excluded)."""
    return [p for p in step_dirs(directory) if _is_complete(p)]


def latest_checkpoint(directory: str) -> str | None:
    """The newest committed checkpoint under ``directory``, or None."""
    cks = list_checkpoints(directory)
    return cks[-1] if cks else None


def checkpoint_step(path: str) -> int:
    return int(os.path.basename(os.path.normpath(path))[len(PREFIX):])


# ----------------------------------------------------------------------------------------------- runs
def _earlier_run(out_dir: str) -> list[str]:
    found = []
    ck = os.path.join(out_dir, "checkpoints")
    if step_dirs(ck):
        found.append(os.path.join(ck, os.path.basename(step_dirs(ck)[-1])))
    for n in ("metrics.jsonl", "summary.json"):
        if os.path.exists(os.path.join(out_dir, n)):
            found.append(os.path.join(out_dir, n))
    return found


def check_run_folder(out_dir: str, *, resume: bool = False, overwrite: bool = False) -> str | None:
    """Decide whether a run may start in ``out_dir`` (touches nothing). Returns the checkpoint to resume
    from (``resume``), else None. Raises :class:`RunFolderError`:

    * ``resume`` and ``overwrite`` together;
    * a new run (neither flag) into a folder holding an earlier run's checkpoints or metrics;
    * ``resume`` without a committed checkpoint to resume.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other")
    if resume:
        ck = os.path.join(out_dir, "checkpoints")
        path = latest_checkpoint(ck)
        if path is None:
            broken = [os.path.basename(p) for p in step_dirs(ck)]
            extra = f" (only incomplete or damaged: {', '.join(broken)})" if broken else ""
            raise RunFolderError(f"--resume: no checkpoint to resume in {ck}{extra}")
        return path
    if not overwrite:
        found = _earlier_run(out_dir)
        if found:
            raise RunFolderError(f"{out_dir} holds an earlier run ({', '.join(found)}); pass --resume to "
                                 "continue it or --overwrite to replace it, or choose another --out")
    return None


def clear_run_files(out_dir: str) -> None:
    """Remove an earlier run's files (only the names in :data:`RUN_FILES`)."""
    for n in RUN_FILES:
        p = os.path.join(out_dir, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)
