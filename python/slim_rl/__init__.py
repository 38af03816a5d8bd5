"""slim_rl: a thin SLIM-RL trainer for block-diffusion LMs built on slim_ops.

``slim_rl.generate(model, prompts, ...)`` is the block-diffusion generation engine (the module is callable),
``slim_rl.models.tiny(...)`` / ``slim_rl.models.load(...)`` build or load models; the trainer, rewards and
CLI live in the other submodules. Submodules load lazily so ``import slim_rl`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("generate", "models", "trainer", "rewards", "sandbox", "advantages", "checkpoint", "config",
               "tasks", "cli")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"slim_rl.{name}")
    raise AttributeError(f"module 'slim_rl' has no attribute {name!r}")
