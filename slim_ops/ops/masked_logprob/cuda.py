"""CUDA backend of ``logprob_from_logits``: calls ``slim_ops._C`` (csrc/logprob) with raw pointers and the
current stream; loading, argument checks, dtype codes and error translation are slim_ops._ext's."""

from __future__ import annotations

import torch

from slim_ops import _ext

_FN = "slim_ops.ops.masked_logprob.cuda"


def _check_inputs(fn: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be a [N, V] tensor, got {getattr(logits, 'shape', logits)}")
    _ext.check_tensor(fn, "logits", logits, dtypes=tuple(_ext.DTYPE_CODES), device="cuda")
    _ext.check_tensor(fn, "labels", labels, shape=(logits.shape[0],), device=logits.device)
    return logits if logits.stride(1) == 1 else logits.contiguous()


def logprob_from_logits_fwd_cuda(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                                 with_entropy: bool):
    """logits [N, V] bf16/fp16/fp32 CUDA, labels [N] -> (logp [N], lse [N], entropy [N] or [0]) fp32."""
    fn = f"{_FN}.logprob_from_logits_fwd_cuda"
    logits = _check_inputs(fn, logits, labels)
    ext = _ext.require("logprob_from_logits", "cuda")
    N, V = logits.shape
    labels = labels.to(torch.int64).contiguous()
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=logits.device)
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    code = ext.logprob_from_logits(logits.data_ptr(), _ext.dtype_code(fn, "logits", logits), labels.data_ptr(),
                                   logp.data_ptr(), lse.data_ptr(), ent.data_ptr() if with_entropy else 0,
                                   N, V, logits.stride(0), 1.0 / temperature, stream)
    _ext.check_status(code, "logprob_from_logits", "cuda")
    return logp, lse, ent


def logprob_from_logits_bwd_cuda(grad_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                                 lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """dlogits [N, V] (logits dtype) = g/T · (onehot(labels) − exp(z/T − lse))."""
    fn = f"{_FN}.logprob_from_logits_bwd_cuda"
    logits = _check_inputs(fn, logits, labels)
    N, V = logits.shape
    _ext.check_tensor(fn, "grad_logp", grad_logp, shape=(N,), device=logits.device)
    _ext.check_tensor(fn, "lse", lse, shape=(N,), dtypes=(torch.float32,), device=logits.device)
    ext = _ext.require("logprob_from_logits_bwd", "cuda")
    out = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    grad = grad_logp.float().contiguous()
    labels = labels.to(torch.int64).contiguous()
    lse = lse.contiguous()
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    code = ext.logprob_from_logits_bwd(grad.data_ptr(), logits.data_ptr(), _ext.dtype_code(fn, "logits", logits),
                                       labels.data_ptr(), lse.data_ptr(), out.data_ptr(), N, V,
                                       logits.stride(0), out.stride(0), 1.0 / temperature, stream)
    _ext.check_status(code, "logprob_from_logits_bwd", "cuda")
    return out
