"""Multi-process training with torch.distributed (launch with ``torchrun``).

* :func:`init` reads the ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the
  process group (``gloo`` on CPU, ``nccl`` on CUDA); one process without those variables is rank 0 of 1.
* Rollouts are split across ranks and :func:`all_gather_objects` brings every rank the whole batch, so
  advantages are computed over complete groups and the rows are built identically everywhere.
* Data parallel (``dist.strategy=ddp``): each rank takes its share of the rows; after gradient
  accumulation :func:`all_reduce_gradients` sums the gradients (one flat buffer per dtype). With the
  loss of every micro-batch scaled by ``rows / global rows`` the summed gradient is the gradient of the
  global loss, so W processes and one process take the same step on the same global batch.
* FSDP2 (``dist.strategy=fsdp``): :func:`wrap_fsdp` shards every decoder layer and the root with
  ``torch.distributed.fsdp.fully_shard``; FSDP reduce-scatters the gradients itself (averaging over
  ranks), so the trainer scales the loss by the world size and skips :func:`all_reduce_gradients`.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "all_gather_objects", "all_reduce_gradients", "broadcast_parameters",
           "wrap_fsdp", "barrier", "shutdown"]


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


def init(backend: str = "auto", device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
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
        dist.init_process_group(backend=backend)
        atexit.register(_destroy_at_exit)  # ranks leave together; no gloo thread is torn down mid-flight
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device, True)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order (a one-element list without a process group)."""
    if not info.active:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum gradients over ranks (missing gradients count as zeros), one flat buffer per dtype/device."""
    if not info.active:
        return
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for ps in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        o = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[o:o + n].view_as(p.grad))
            o += n


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's weights."""
    if not info.active:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def wrap_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): each decoder layer, the decoder (embeddings, final
    norm), the LM head and the root are separate units, because the trainer calls the decoder and the
    head directly (hidden states of the masked rows only) rather than the root's forward."""
    from torch.distributed.fsdp import fully_shard

    decoder = getattr(model, "model", None)
    for layer in getattr(decoder, "layers", []):
        fully_shard(layer)
    if decoder is not None:
        fully_shard(decoder)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        fully_shard(head)
    fully_shard(model)
    # FSDP initialises lazily from the first forward, which must go through the root: do one tiny one
    # (every rank together) so that later direct calls of the decoder / head find the state ready.
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    return model


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def shutdown(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        dist.destroy_process_group()
