"""Multi-process training with torch.distributed (launch with ``torchrun``).

* :func:`init` reads the ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the
  process group (``gloo`` on CPU, ``nccl`` on CUDA); one process without those variables is rank 0 of 1.
* Rollouts are split across ranks and :func:`all_gather_objects` brings every rank the whole batch, so
  advantages are computed over complete groups and the rows are built identically everywhere.
* The trainer's training forward is one module (:class:`slim_rl.trainer.Scorer`: decoder -> hidden states
  of the loss positions -> masked log-probs through the LM head's whole weight). That module is what
  the strategies wrap:

  - ``dist.strategy=ddp``: :func:`wrap_ddp` = ``torch.nn.parallel.DistributedDataParallel``; the trainer
    runs the micro-batches of a minibatch under ``no_sync()`` except the last, so gradients are
    all-reduced once per optimizer step, overlapped with the last backward.
  - ``dist.strategy=fsdp``: :func:`wrap_fsdp` = FSDP2 ``fully_shard`` on every decoder layer and on the
    root (the scorer). The embeddings, final norm and LM head belong to the root unit, so inside the
    root's forward the head weight is the whole (all-gathered) tensor: ``slim_ops.masked_logprob`` gets
    it without any ``[n, V]`` logits, and its gradient is reduce-scattered back to the shards by FSDP.

  Both average gradients over ranks, so the trainer scales each micro-batch loss by
  ``world * rows / global rows``: W processes take the same step as one process on the same batch.
  Every rank runs the same number of forwards per minibatch (FSDP all-gathers in each one; DDP needs
  each rank's synchronising backward), padding with zero-weight micro-batches where a rank has fewer rows.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "all_gather_objects", "any_true", "broadcast_parameters", "wrap_ddp",
           "wrap_fsdp", "fsdp_units", "barrier", "shutdown",
           "peer_failure", "abandon"]


class DistInfo:
    """rank, world size, local rank, device, and whether a process group is active."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: str = "cpu",
                 active: bool = False):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device, self.active = device, active

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"DistInfo(rank={self.rank}, world={self.world}, device={self.device}, active={self.active})"


def init(backend: str = "auto", device: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); else a single process.

    ``timeout_s``: how long any collective may wait for the other ranks before it raises (torch's default when
    None); see :func:`peer_failure`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world <= 1:
        return DistInfo(0, 1, 0, device, False)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=float(timeout_s))}
        dist.init_process_group(backend=backend, **kw)
        atexit.register(_destroy_at_exit)  # ranks leave together; no gloo thread is torn down mid-flight
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device, True)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order (a one-element list without a process group)."""
    if not info.active:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def any_true(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    if not info.active:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's weights."""
    if not info.active:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def wrap_ddp(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` (broadcasts rank 0's weights; gradients averaged over ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(info.device)
    ids = [dev] if dev.type == "cuda" else None
    # buffers are the same on every rank (rotary tables): no per-forward broadcast. Newer torch names the
    # switch forward_sync_buffers (and deprecates broadcast_buffers); older torch knows only the latter.
    import inspect

    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=ids, **{sync: False})


def wrap_fsdp(module: torch.nn.Module, model: torch.nn.Module, *, mp_policy=None,
              cpu_offload: bool = False) -> torch.nn.Module:
    """FSDP2 ``fully_shard``: each decoder layer of ``model`` (the HF model inside ``module``) is a unit and
    ``module`` is the root unit, which also holds the embeddings, the final norm and the LM head (so the
    head weight is whole inside the root's forward). Returns ``module`` (sharded in place).

    ``mp_policy``: a ``MixedPrecisionPolicy`` (fp32 shards, compute-dtype all-gathers, fp32 reduce-scatter);
    ``cpu_offload``: ``CPUOffloadPolicy`` (shards, gradients and so the AdamW state live in CPU memory)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kw: dict[str, Any] = {}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    decoder = getattr(model, "model", None)
    for layer in getattr(decoder, "layers", []):
        fully_shard(layer, **kw)
    fully_shard(module, **kw)
    return module


def fsdp_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units under ``module`` (root included); empty when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


_PEER_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "nccl",
                 "gloo", "socket", "peer")
_abandoned = False


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that timed out or lost a peer (gloo: "Timed out waiting ... for recv",
    "Connection closed by peer"; NCCL: DistBackendError / watchdog timeouts), not an error of this rank's own."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in msg for m in _PEER_MARKERS)


def abandon() -> None:
    """After a peer failure: leave without the exit barrier (it would wait for the dead rank again)."""
    global _abandoned
    _abandoned = True


def _destroy_at_exit() -> None:
    if _abandoned:
        return
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            gc.collect()
            dist.destroy_process_group()


def shutdown(info: DistInfo) -> None:
    """Destroy the process group. Objects still holding collectives' work (DDP reducers, pending futures) are
    collected first, so that no gloo thread drops a tensor while the interpreter is being torn down."""
    if info.active and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
