"""CUDA backend of ``logprob_from_logits``: calls ``slim_ops._C`` (csrc/logprob) with raw pointers and the
current stream; errors come back as cudaError_t codes and are raised here."""

from __future__ import annotations

import torch

from slim_ops._backend import cuda_extension

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _ext():
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("slim_ops._C is not built: reinstall with nvcc on PATH, e.g. "
                           "`SLIM_OPS_CUDA=ON pip install --no-build-isolation .`")
    return ext


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"slim_ops._C.{what} failed: {_ext().error_string(code)} (cudaError_t {code})")


def logprob_from_logits_fwd_cuda(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                                 with_entropy: bool):
    ext = _ext()
    N, V = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    labels = labels.to(torch.int64).contiguous()
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=logits.device)
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    code = ext.logprob_from_logits(logits.data_ptr(), _DTYPE_CODE[logits.dtype], labels.data_ptr(),
                                   logp.data_ptr(), lse.data_ptr(), ent.data_ptr() if with_entropy else 0,
                                   N, V, logits.stride(0), 1.0 / temperature, stream)
    _check(code, "logprob_from_logits")
    return logp, lse, ent


def logprob_from_logits_bwd_cuda(grad_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                                 lse: torch.Tensor, temperature: float) -> torch.Tensor:
    ext = _ext()
    N, V = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    out = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    grad = grad_logp.float().contiguous()
    labels = labels.to(torch.int64).contiguous()
    lse = lse.contiguous()
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    code = ext.logprob_from_logits_bwd(grad.data_ptr(), logits.data_ptr(), _DTYPE_CODE[logits.dtype],
                                       labels.data_ptr(), lse.data_ptr(), out.data_ptr(), N, V,
                                       logits.stride(0), out.stride(0), 1.0 / temperature, stream)
    _check(code, "logprob_from_logits_bwd")
    return out
