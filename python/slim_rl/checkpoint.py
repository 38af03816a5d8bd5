"""Atomic training checkpoints: safetensors weights + optimizer + RNG states + step.

Layout: ``<dir>/step_00000012/`` holding ``model.safetensors``, ``optimizer.pt``, ``state.pt`` (RNG
states, step, extra trainer state) and ``manifest.json`` (byte size and SHA-256 of each file).

Writing is atomic: everything goes into ``step_XXXXXXXX.tmp-<pid>``, each file is fsynced, the
manifest is written last, the directory is renamed to its final name (``rename`` is atomic on POSIX)
and the parent directory is fsynced. A checkpoint cut off at any point is therefore either a ``.tmp``
directory (ignored) or — if the files were damaged afterwards — fails its manifest check and is
skipped: :func:`latest_checkpoint` returns the newest *complete* one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "rng_state",
           "set_rng_state"]

_PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    """Python, torch CPU and CUDA RNG states (the global generators)."""
    st: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage: store contiguous clones
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(directory: str, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, extra: dict[str, Any] | None = None,
                    keep: int = 0) -> str:
    """Write checkpoint ``step`` atomically under ``directory``; returns its path.

    ``extra`` (picklable) is stored with the RNG states; ``keep > 0`` deletes all but the newest
    ``keep`` complete checkpoints afterwards.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"{_PREFIX}{step:08d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = {"model.safetensors": None, "optimizer.pt": None, "state.pt": None}
    save_file(_model_state(model), os.path.join(tmp, "model.safetensors"), metadata={"step": str(step)})
    torch.save(optimizer.state_dict() if optimizer is not None else {}, os.path.join(tmp, "optimizer.pt"))
    torch.save({"step": step, "rng": rng_state(), "extra": extra or {}}, os.path.join(tmp, "state.pt"))
    manifest: dict[str, Any] = {"step": step, "files": {}}
    for name in files:
        p = os.path.join(tmp, name)
        _fsync_file(p)
        manifest["files"][name] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
    mpath = os.path.join(tmp, "manifest.json")
    with open(mpath, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _is_complete(path: str) -> bool:
    mpath = os.path.join(path, "manifest.json")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        for name, meta in manifest["files"].items():
            p = os.path.join(path, name)
            if os.path.getsize(p) != meta["bytes"] or _sha256(p) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoints under ``directory``, oldest first (``.tmp`` and damaged ones excluded)."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory)
                   if n.startswith(_PREFIX) and n[len(_PREFIX):].isdigit())
    return [os.path.join(directory, n) for n in names if _is_complete(os.path.join(directory, n))]


def latest_checkpoint(directory: str) -> str | None:
    """The newest complete checkpoint under ``directory``, or None."""
    cks = list_checkpoints(directory)
    return cks[-1] if cks else None


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load weights (+ optimizer, + RNG states) from a checkpoint; returns ``{"step", "extra"}``.

    Raises ``ValueError`` if the checkpoint is incomplete or damaged.
    """
    from safetensors.torch import load_file

    if not _is_complete(path):
        raise ValueError(f"checkpoint {path!r} is incomplete or damaged (manifest check failed)")
    state = load_file(os.path.join(path, "model.safetensors"))
    device = next(model.parameters()).device
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=False))
    st = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    if restore_rng:
        set_rng_state(st["rng"])
    return {"step": int(st["step"]), "extra": st.get("extra", {})}
