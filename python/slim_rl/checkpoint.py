"""Sharded, atomic training checkpoints (``torch.distributed.checkpoint``) and run folders.

Layout of one checkpoint, ``<run>/checkpoints/step_00000012/``:

* ``.metadata`` + ``__<rank>_0.distcp`` — the model weights and the optimizer state, written by
  ``torch.distributed.checkpoint`` (DCP): every rank writes its own shard (FSDP2 shards, or one copy of
  the replicated DDP / single-process tensors). Tensors only: nothing in them is unpickled on load.
* ``rng_<rank>.pt`` — each rank's Python / torch / CUDA RNG states (plain tensors and tuples).
* ``trainer.json`` — step, optimizer hyper-parameters, counters, world size, strategy, config.
* ``manifest.json`` — written **last**, the commit marker: byte size and SHA-256 of every other file.

Writing goes to ``step_XXXXXXXX.tmp``; after every rank has written (barrier), the files are hashed
(split over ranks), rank 0 writes the manifest, fsyncs and renames the directory into place (atomic
on POSIX). A directory without a matching manifest is never loaded; ``.tmp`` directories left by a
killed run are removed when the next run starts (:func:`clean_stale`). Nothing loaded can run code:
``torch.load`` with ``weights_only=True``, DCP's pickled ``.metadata`` through an allow-list unpickler.

Run folders (:mod:`slim_rl.runs`, re-exported here) never lose work: a new run refuses a folder that
holds an earlier run unless ``resume`` or ``overwrite`` is asked for, and with ``overwrite`` the earlier
run's files are removed only once the new run has something of its own to write.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import warnings
from typing import Any

import torch

from slim_rl.errors import CheckpointError, RunFolderError
from slim_rl.runs import (
    RUN_FILES,
    _is_complete,
    _manifest,
    check_run_folder,
    checkpoint_step,
    clear_run_files,
    latest_checkpoint,
    list_checkpoints,
    step_dirs,
)

__all__ = ["save_checkpoint", "load_checkpoint", "load_weights", "latest_checkpoint", "list_checkpoints",
           "verify_checkpoint", "clean_stale", "check_run_folder", "clear_run_files", "export_model",
           "CheckpointError", "RunFolderError", "rng_state", "set_rng_state", "RUN_FILES", "checkpoint_step",
           "all_finite", "step_dirs"]

_NO_PG = "torch.distributed is disabled, unavailable or uninitialized"  # DCP's note for one process: intended

_PREFIX = "step_"
_MANIFEST = "manifest.json"
_TRAINER = "trainer.json"



# ----------------------------------------------------------------------------------------------- RNG
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


# ----------------------------------------------------------------------------------------------- files
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


def _files(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n)) and n != _MANIFEST)


def _gather(obj: Any, info) -> list[Any]:
    from slim_rl import distributed as D

    return D.all_gather_objects(obj, info) if info is not None else [obj]


def _barrier(info) -> None:
    if info is not None and info.active:
        torch.distributed.barrier()


def _single():
    from slim_rl.distributed import DistInfo

    return DistInfo()


def _options(model: torch.nn.Module):
    """A model with LoRA adapters (:mod:`slim_rl.lora`) is checkpointed by its trainable parameters only:
    the frozen base comes from ``model.path`` (or the tiny model's seed) when the run is rebuilt."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from slim_rl.lora import has_adapters

    if has_adapters(model):
        return StateDictOptions(ignore_frozen_params=True, strict=False)
    return None


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model, options=_options(model)), None
    return get_state_dict(model, optimizer, options=_options(model))


def _tensors_only(tree: Any, where: str) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _tensors_only(v, f"{where}.{k}")
    elif not isinstance(tree, torch.Tensor):
        raise TypeError(f"checkpoint: {where} is a {type(tree).__name__}, only tensors go into the shards")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(model: torch.nn.Module, info=None) -> bool:
    """Whether every parameter (this rank's shard) of ``model`` is finite, on every rank."""
    from slim_rl import distributed as D

    bad = any(not bool(torch.isfinite(_local(p.detach())).all()) for p in model.parameters())
    return not D.any_true(bad, info or _single())


# ----------------------------------------------------------------------------------------------- save
def save_checkpoint(directory: str, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, extra: dict[str, Any] | None = None,
                    keep: int = 0, info=None) -> str:
    """Write checkpoint ``step`` under ``directory`` (collective: every rank calls it); returns its path.

    ``extra`` (JSON-serialisable) is stored in ``trainer.json``; ``keep > 0`` deletes all but the newest
    ``keep`` complete checkpoints afterwards. Refuses (``CheckpointError``) weights that are not finite.
    An optimizer without state yet (no step taken) is not stored.
    """
    import torch.distributed.checkpoint as dcp

    info = info or _single()
    if not all_finite(model, info):
        raise CheckpointError(f"refusing to checkpoint step {step}: the model has non-finite weights")
    final = os.path.join(directory, f"{_PREFIX}{step:08d}")
    tmp = f"{final}.tmp"
    if info.is_main:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(info)
    with_opt = optimizer is not None and len(optimizer.state) > 0
    msd, osd = _state_dicts(model, optimizer if with_opt else None)
    state: dict[str, Any] = {"model": msd}
    groups: list[dict[str, Any]] = []
    if with_opt:
        state["optim"] = osd["state"]
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in osd["param_groups"]]
    _tensors_only(state, "state")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_PG)
        dcp.save(state, checkpoint_id=tmp, no_dist=not info.active)
    torch.save(rng_state(), os.path.join(tmp, f"rng_{info.rank}.pt"))
    if info.is_main:
        meta = {"step": int(step), "world_size": info.world, "optimizer": with_opt, "param_groups": groups,
                "extra": extra or {}}
        with open(os.path.join(tmp, _TRAINER), "w") as f:
            json.dump(meta, f)
    _barrier(info)
    # hash the files, split over ranks; rank 0 writes the manifest last and commits by renaming
    names = _files(tmp)
    mine = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": _sha256(os.path.join(tmp, n))}
            for i, n in enumerate(names) if i % info.world == info.rank}
    for n in mine:
        _fsync_file(os.path.join(tmp, n))
    parts = _gather(mine, info)
    if info.is_main:
        files = {k: v for p in parts for k, v in p.items()}
        with open(os.path.join(tmp, _MANIFEST), "w") as f:
            json.dump({"step": int(step), "world_size": info.world, "files": files}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):  # re-saving a step: swap in the new one, then drop the old
            old = f"{final}.tmp-replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(directory)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        if keep > 0:
            for stale in list_checkpoints(directory)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier(info)
    return final


# ----------------------------------------------------------------------------------------------- find
def verify_checkpoint(path: str, info=None) -> bool:
    """Full check: the manifest's sizes and SHA-256 hashes (files split over ranks); same answer on
    every rank."""
    from slim_rl import distributed as D

    info = info or _single()
    m = _manifest(path)
    ok = m is not None
    if ok:
        for i, (n, meta) in enumerate(sorted(m["files"].items())):
            if i % info.world != info.rank:
                continue
            p = os.path.join(path, n)
            try:
                if os.path.getsize(p) != meta["bytes"] or _sha256(p) != meta["sha256"]:
                    ok = False
            except (OSError, KeyError, TypeError):
                ok = False
    return not D.any_true(not ok, info)


def clean_stale(directory: str) -> list[str]:
    """Remove ``step_*.tmp*`` directories left by a killed run; returns what was removed."""
    gone = []
    if os.path.isdir(directory):
        for n in sorted(os.listdir(directory)):
            if n.startswith(_PREFIX) and ".tmp" in n:
                shutil.rmtree(os.path.join(directory, n), ignore_errors=True)
                gone.append(n)
    return gone


# ----------------------------------------------------------------------------------------------- load
class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: read it allowing only the classes it is made of (DCP's metadata
    dataclasses, ``torch.Size``, dtypes, paths), so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        if not (module.startswith("torch.distributed.checkpoint")
                or module in ("torch", "torch.serialization", "pathlib", "collections")):
            raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")
        obj = super().find_class(module, name)  # only modules already imported by torch get here
        ok = ((module.startswith("torch.distributed.checkpoint") and isinstance(obj, type))
              or (module == "torch" and (obj is torch.Size or isinstance(obj, torch.dtype)))
              or (module == "torch.serialization" and name == "_get_layout")
              or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
              or (module == "collections" and name == "OrderedDict"))
        if not ok:
            raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")
        return obj


def _reader(path: str):
    """A ``FileSystemReader`` whose metadata is read with :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with open(os.path.join(path, ".metadata"), "rb") as f:
                try:
                    md = _MetadataUnpickler(f).load()
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 - a damaged metadata file
                    raise CheckpointError(f"checkpoint {path!r} has unreadable metadata ({e})") from None
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _SafeReader(path)


def _safe_planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class _TensorsOnlyPlanner(DefaultLoadPlanner):
        """Our shards hold tensors only; a crafted one carrying pickled objects is refused (DCP's default
        planner would unpickle them without restriction)."""

        def load_bytes(self, read_item, value) -> None:  # pragma: no cover - our checkpoints have none
            raise CheckpointError(f"checkpoint holds a pickled object at {read_item.dest_index.fqn!r}; "
                                  "only tensors are expected")

    return _TensorsOnlyPlanner()


def _check_shapes(path: str, state: dict[str, Any]) -> None:
    """Every tensor the model needs is in the checkpoint with the same shape (clear error otherwise)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _reader(path).read_metadata().state_dict_metadata
    for k, t in state["model"].items():
        fqn = f"model.{k}"
        if fqn not in md:
            raise CheckpointError(f"checkpoint {path!r} does not match the model: it has no {k!r}")
        meta = md[fqn]
        shape = tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else None
        if shape != tuple(t.shape):
            raise CheckpointError(f"checkpoint {path!r} does not match the model: {k} is {list(shape or ())} "
                                  f"there, {list(t.shape)} here (another vocabulary or model size?)")
    if "optim" in state and not any(k.startswith("optim.") for k in md):
        raise CheckpointError(f"checkpoint {path!r} holds no optimizer state")


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    restore_rng: bool = True, info=None, verify: bool = True) -> dict[str, Any]:
    """Load weights (+ optimizer, + this rank's RNG states) from a checkpoint (collective); returns
    ``{"step", "extra"}``. Raises ``CheckpointError`` when it is incomplete, damaged, written by another
    number of processes (optimizer / RNG), or does not match the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    info = info or _single()
    if not _is_complete(path) or (verify and not verify_checkpoint(path, info)):
        raise CheckpointError(f"checkpoint {path!r} is incomplete or damaged (manifest check failed)")
    with open(os.path.join(path, _TRAINER)) as f:
        meta = json.load(f)
    with_opt = optimizer is not None and bool(meta.get("optimizer"))
    if optimizer is not None and with_opt and int(meta.get("world_size", 1)) != info.world:
        raise CheckpointError(f"checkpoint {path!r} was written by {meta.get('world_size')} processes; resume "
                              f"it with the same number (this run has {info.world})")
    msd, osd = _state_dicts(model, optimizer if with_opt else None)
    state: dict[str, Any] = {"model": msd}
    if with_opt:
        state["optim"] = osd["state"]
    _check_shapes(path, state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_PG)
        dcp.load(state, storage_reader=_reader(path), planner=_safe_planner(), no_dist=not info.active)
    if with_opt:
        saved = meta.get("param_groups") or []
        for g, s in zip(osd["param_groups"], saved):
            for k, v in s.items():
                if k != "params":
                    g[k] = tuple(v) if k == "betas" else v
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_options(model))
    else:
        set_model_state_dict(model, msd, options=_options(model))
        if optimizer is not None:
            optimizer.state.clear()
    if restore_rng:
        rng = os.path.join(path, f"rng_{info.rank}.pt")
        if os.path.exists(rng):
            set_rng_state(torch.load(rng, weights_only=True))
    return {"step": int(meta["step"]), "extra": meta.get("extra", {})}


def load_weights(path: str, model: torch.nn.Module, info=None) -> int:
    """Only the model weights of a checkpoint (any world size); returns its step."""
    return load_checkpoint(path, model, None, restore_rng=False, info=info)["step"]


# ----------------------------------------------------------------------------------------------- export
def export_model(model: torch.nn.Module, to: str, *, tokenizer: str | None = None) -> str:
    """Write ``model`` (a loaded, unsharded HF model) to ``to`` as one Hugging Face folder
    (``config.json`` + ``model.safetensors``, the special ids in the config), atomically."""
    if os.path.exists(to) and (not os.path.isdir(to) or os.listdir(to)):
        raise RunFolderError(f"export: {to} already exists and is not empty")
    tmp = f"{os.path.normpath(to)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer, local_files_only=True).save_pretrained(tmp)
    for n in os.listdir(tmp):
        _fsync_file(os.path.join(tmp, n))
    if os.path.isdir(to):
        os.rmdir(to)
    os.rename(tmp, to)
    _fsync_dir(os.path.dirname(os.path.abspath(to)))
    return to
