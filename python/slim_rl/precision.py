"""Mixed precision: master weights in ``model.master_dtype`` (float32), compute in ``model.dtype``.

The trained parameters, their gradients, the gradients' reduction across ranks and the AdamW state are
in the master dtype, so an update of 1e-6 is not rounded away (in a bf16 weight ~N(0, 0.02) it is below
half a step for almost every weight). Forwards compute in the compute dtype:

* FSDP2: ``MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=float32)`` over fp32 shards
  (:func:`fsdp_policy`): each unit's all-gather casts its weights, gradients come back and are
  reduce-scattered in fp32.
* DDP and one process: fp32 parameters, the training forward under ``torch.autocast`` in the compute
  dtype (:func:`autocast`; CUDA and CPU alike), so DDP all-reduces fp32 gradients.
* Rollouts and evaluation decode with a compute-dtype copy of the weights made once per rollout
  (:class:`DecodeCopy`; under FSDP2 the gathered weights are already in the compute dtype), never
  with the master weights.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

__all__ = ["DTYPES", "dtype_of", "autocast", "fsdp_policy", "DecodeCopy", "adamw"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    return DTYPES[name]


def autocast(device: str, compute: torch.dtype, master: torch.dtype, enabled: bool = True):
    """``torch.autocast`` in ``compute`` when it is narrower than the master dtype; else a no-op."""
    if not enabled or compute == master:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=compute)


def adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the parameters' device (CPU and CUDA): one pass per
    tensor and no temporaries the size of a parameter (the per-tensor loop keeps two, e.g. 2 x 300 MB for a
    V = 151936 head), same update. FSDP2's sharded (DTensor) parameters keep the default implementation."""
    params = list(params)
    plain = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for p in params)
    return torch.optim.AdamW(params, fused=bool(plain and params), **kw)


def fsdp_policy(compute: torch.dtype, master: torch.dtype):
    """FSDP2's policy for fp32 shards computing in ``compute`` (None when both are the same)."""
    if compute == master:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


class DecodeCopy:
    """A compute-dtype copy of a model for decoding: built (or refreshed) when entered, with the master
    weights cast once, and dropped on exit so it takes no memory during the update."""

    def __init__(self, model: torch.nn.Module, compute: torch.dtype):
        self.model, self.compute = model, compute

    @contextlib.contextmanager
    def __call__(self) -> Iterator[torch.nn.Module]:
        master = next(self.model.parameters()).dtype
        if master == self.compute:
            yield self.model
            return
        params = list(self.model.named_parameters(remove_duplicate=False))
        buffers = list(self.model.named_buffers(remove_duplicate=False))
        # copy the module tree without its tensors (placeholders), then give it compute-dtype casts of them,
        # one per tensor: tied weights stay tied
        memo = {id(t): torch.empty(0) for _, t in (*params, *buffers)}
        shell = copy.deepcopy(self.model, memo=memo)
        cast: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in params:
                if id(p) not in cast:
                    cast[id(p)] = torch.nn.Parameter(p.detach().to(self.compute), requires_grad=False)
                _set(shell, name, cast[id(p)])
            for name, b in buffers:
                if id(b) not in cast:
                    cast[id(b)] = (b.detach().to(self.compute) if b.is_floating_point() and b.dtype == master
                                   else b.detach().clone())
                _set(shell, name, cast[id(b)])
        del cast
        shell.eval()
        try:
            yield shell
        finally:
            del shell


def _set(root: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if isinstance(t, torch.nn.Parameter):
        mod._parameters[leaf] = t
    else:
        mod._buffers[leaf] = t
