"""Public masked log-prob ops (docs/objective.md, 'Log-probabilities'): ``masked_logprob`` (hidden + LM head,
never [N, V]) and ``logprob_from_logits`` (callers that already hold logits).

Registered as ``slim_ops::masked_logprob`` / ``slim_ops::masked_logprob_bwd`` and
``slim_ops::logprob_from_logits`` / ``slim_ops::logprob_from_logits_bwd``. The forward saves only the
per-row logsumexp; the backward recomputes logits tile by tile. Backends: ``torch`` (chunked: memory
bounded by one [rows, V-chunk] tile), ``triton`` (fused kernels) and, for ``logprob_from_logits``,
``cuda`` (one pass over the logits with 16-byte loads).
"""

from __future__ import annotations

import functools

import torch

from slim_ops._backend import autocast_off, pick

# torch backend tile: at most this many fp32 logits live at once (plus a few same-sized temporaries);
# CPU tiles stay cache-friendly, GPU tiles are large enough to keep the GEMMs efficient
TORCH_TILE_ELEMS = 1 << 21
TORCH_MAX_ROWS = 1024
TORCH_TILE_ELEMS_CUDA = 1 << 25
TORCH_MAX_ROWS_CUDA = 8192
# Probabilities are floored at exp(-60) ~ 8.7e-27 (exp() arguments clamped from below) in the torch backend's tiles:
# V such terms change a row's sum, or its gradient, by <= V * 8.7e-27 ~ 1e-21 relative, far below fp32's
# resolution. Without the floor, peaky logits send exp() off the CPU's vectorised fast path (underflow: measured
# 70x slower) and fill the backward's GEMM operands with subnormal numbers, whose products cost microcode
# assists (measured: the masked log-prob backward of a V = 151936 step 4x slower).
EXP_FLOOR = -60.0


def _grad_tile_(z: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """-g·exp(z - lse) per row, in place in z [rows, cols], probabilities floored at exp(EXP_FLOOR)."""
    return torch.exp(z.sub_(lse.unsqueeze(1)).clamp_min_(EXP_FLOOR)).mul_(-g.unsqueeze(1))


# --------------------------------------------------------------------------------------------------
# torch backend (chunked, recomputing)
# --------------------------------------------------------------------------------------------------
@functools.cache
def mm_out_dtype_supported(device_type: str) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` (``aten::mm.dtype``) has a kernel for this device
    type in this torch build; decided once, from the dispatcher's registrations, without running anything."""
    key = {"cuda": "CUDA"}.get(device_type)
    if key is None or not hasattr(torch.ops.aten.mm, "dtype"):
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(torch.ops.aten.mm.dtype.name(), key))


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result, without upcasting a bf16/fp16 operand where torch has
    an fp32-output GEMM for the device. Errors of the GEMM itself (shapes, out of memory) propagate."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and mm_out_dtype_supported(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, in place when the operands are fp32."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc += _mm_f32(a, b)


def _chunks(N: int, V: int, cuda: bool = False) -> tuple[int, int]:
    elems, max_rows = (TORCH_TILE_ELEMS_CUDA, TORCH_MAX_ROWS_CUDA) if cuda else (TORCH_TILE_ELEMS, TORCH_MAX_ROWS)
    rc = max(1, min(N, max_rows))
    vc = max(256, elems // rc)
    return rc, min(vc, V)


@autocast_off
def _masked_logprob_fwd_torch(hidden, weight, labels, temperature: float, with_entropy: bool):
    """Online logsumexp over vocabulary chunks. With s = Σ exp(z − m) and the centred
    t = Σ exp(z − m)·(z − m) about the running max m, the entropy is log s − t/s."""
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    inv_t = 1.0 / temperature
    m = torch.full((N,), float("-inf"), device=dev)
    s = torch.zeros(N, device=dev)
    t = torch.zeros(N, device=dev)
    rc, vc = _chunks(N, V, hidden.is_cuda)
    for v0 in range(0, V, vc):
        wct = weight[v0:v0 + vc].t()
        if not hidden.is_cuda and wct.dtype != torch.float32:
            wct = wct.float()  # upcast the chunk once for all row chunks
        for r0 in range(0, N, rc):
            r = slice(r0, r0 + rc)
            z = _mm_f32(hidden[r], wct)  # [rc, vc]
            if inv_t != 1.0:
                z.mul_(inv_t)
            m_old, s_old = m[r].clone(), s[r].clone()
            m_new = torch.maximum(m_old, z.max(1).values)
            alpha = torch.exp(m_old - m_new)
            zc = z.sub_(m_new.unsqueeze(1)).clamp_min_(EXP_FLOOR)
            e = torch.exp(zc)
            s[r] = s_old * alpha + e.sum(1)
            if with_entropy:
                carried = torch.where(s_old > 0, alpha * (t[r] + (m_old - m_new) * s_old), 0.0)
                t[r] = carried + (e * zc).sum(1)
            m[r] = m_new
    lse = m + torch.log(s)
    zy = (hidden.float() * weight[labels].float()).sum(1) * inv_t
    logp = zy - lse
    ent = (torch.log(s) - t / s) if with_entropy else torch.empty(0, device=dev)
    return logp, lse, ent


@autocast_off
def _masked_logprob_bwd_torch(grad_logp, hidden, weight, labels, lse, temperature: float, need_dh: bool = True,
                              need_dw: bool = True):
    """dz = g·(onehot − softmax)/T recomputed per tile; dW written once per vocabulary chunk. A gradient
    that is not needed comes back as an empty tensor and its GEMM is skipped."""
    N, d = hidden.shape
    V = weight.shape[0]
    inv_t = 1.0 / temperature
    g = grad_logp.float() * inv_t
    dh = torch.zeros(N if need_dh else 0, d, dtype=torch.float32, device=hidden.device)
    dw = torch.empty_like(weight) if need_dw else weight.new_empty((0, d))
    rc, vc = _chunks(N, V, hidden.is_cuda)
    hf = hidden if hidden.is_cuda else hidden.float()
    for v0 in range(0, V, vc):
        wc = weight[v0:v0 + vc]
        if not hidden.is_cuda and wc.dtype != torch.float32:
            wc = wc.float()
        dwc = torch.zeros(wc.shape[0] if need_dw else 0, d, dtype=torch.float32, device=hidden.device)
        for r0 in range(0, N, rc):
            r = slice(r0, r0 + rc)
            z = _mm_f32(hf[r], wc.t())
            if inv_t != 1.0:
                z.mul_(inv_t)
            dz = _grad_tile_(z, lse[r], g[r])  # [rc, vc]
            lab = labels[r] - v0
            hit = (lab >= 0) & (lab < wc.shape[0])
            dz.scatter_add_(1, lab.clamp(0, wc.shape[0] - 1).unsqueeze(1),
                            torch.where(hit, g[r], torch.zeros_like(g[r])).unsqueeze(1))
            dzc = dz.to(wc.dtype) if hidden.is_cuda else dz
            if need_dh:
                _addmm_f32_(dh[r], dzc, wc)
            if need_dw:
                _addmm_f32_(dwc, dzc.t(), hf[r])
        if need_dw:
            dw[v0:v0 + vc] = dwc.to(weight.dtype)
    return dh.to(hidden.dtype), dw


@autocast_off
def _logprob_from_logits_fwd_torch(logits, labels, temperature: float, with_entropy: bool):
    N, V = logits.shape
    rc = max(1, min(N, TORCH_TILE_ELEMS // max(V, 1)))
    logp = torch.empty(N, device=logits.device)
    lse = torch.empty(N, device=logits.device)
    ent = torch.empty(N if with_entropy else 0, device=logits.device)
    for r0 in range(0, N, rc):
        r = slice(r0, r0 + rc)
        z = logits[r].float() / temperature
        lse[r] = torch.logsumexp(z, dim=1)
        logp[r] = z.gather(1, labels[r].unsqueeze(1)).squeeze(1) - lse[r]
        if with_entropy:
            ent[r] = lse[r] - (torch.softmax(z, dim=1) * z).sum(1)
    return logp, lse, ent


@autocast_off
def _logprob_from_logits_bwd_torch(grad_logp, logits, labels, lse, temperature: float):
    N, V = logits.shape
    rc = max(1, min(N, TORCH_TILE_ELEMS // max(V, 1)))
    out = torch.empty_like(logits)
    g = grad_logp.float() / temperature
    for r0 in range(0, N, rc):
        r = slice(r0, r0 + rc)
        dz = _grad_tile_(logits[r].float() / temperature, lse[r], g[r])
        dz.scatter_add_(1, labels[r].unsqueeze(1), g[r].unsqueeze(1))
        out[r] = dz.to(logits.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("slim_ops::masked_logprob", mutates_args=())
def _masked_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                        with_entropy: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from slim_ops.ops.masked_logprob.triton import masked_logprob_fwd_triton

        return masked_logprob_fwd_triton(hidden, weight, labels, temperature, with_entropy)
    return _masked_logprob_fwd_torch(hidden, weight, labels, temperature, with_entropy)


@_masked_logprob_fwd.register_fake
def _(hidden, weight, labels, temperature, with_entropy, backend):
    N = hidden.shape[0]
    f = hidden.new_empty((N,), dtype=torch.float32)
    return f, torch.empty_like(f), hidden.new_empty((N if with_entropy else 0,), dtype=torch.float32)


@torch.library.custom_op("slim_ops::masked_logprob_bwd", mutates_args=())
def _masked_logprob_bwd(grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                        labels: torch.Tensor, lse: torch.Tensor, temperature: float, need_dh: bool,
                        need_dw: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from slim_ops.ops.masked_logprob.triton import masked_logprob_bwd_triton

        return masked_logprob_bwd_triton(grad_logp, hidden, weight, labels, lse, temperature, need_dh, need_dw)
    return _masked_logprob_bwd_torch(grad_logp, hidden, weight, labels, lse, temperature, need_dh, need_dw)


@_masked_logprob_bwd.register_fake
def _(grad_logp, hidden, weight, labels, lse, temperature, need_dh, need_dw, backend):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty((0, hidden.shape[1]))
    dw = torch.empty_like(weight) if need_dw else weight.new_empty((0, weight.shape[1]))
    return dh, dw


def _mlp_setup(ctx, inputs, output):
    hidden, weight, labels, temperature, _, backend = inputs
    _, lse, ent = output
    ctx.mark_non_differentiable(lse, ent)
    ctx.save_for_backward(hidden, weight, labels, lse)
    ctx.temperature, ctx.backend = temperature, backend


def _mlp_backward(ctx, grad_logp, grad_lse, grad_ent):
    hidden, weight, labels, lse = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = _masked_logprob_bwd(grad_logp.contiguous(), hidden, weight, labels, lse, ctx.temperature,
                                 need_dh, need_dw, ctx.backend)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None, None


_masked_logprob_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)


@torch.library.custom_op("slim_ops::logprob_from_logits", mutates_args=())
def _logprob_from_logits_fwd(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                             with_entropy: bool,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        from slim_ops.ops.masked_logprob.cuda import logprob_from_logits_fwd_cuda

        return logprob_from_logits_fwd_cuda(logits, labels, temperature, with_entropy)
    if backend == "triton":
        from slim_ops.ops.masked_logprob.triton import logprob_from_logits_fwd_triton

        return logprob_from_logits_fwd_triton(logits, labels, temperature, with_entropy)
    return _logprob_from_logits_fwd_torch(logits, labels, temperature, with_entropy)


@_logprob_from_logits_fwd.register_fake
def _(logits, labels, temperature, with_entropy, backend):
    N = logits.shape[0]
    f = logits.new_empty((N,), dtype=torch.float32)
    return f, torch.empty_like(f), logits.new_empty((N if with_entropy else 0,), dtype=torch.float32)


@torch.library.custom_op("slim_ops::logprob_from_logits_bwd", mutates_args=())
def _logprob_from_logits_bwd(grad_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                             lse: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    if backend == "cuda":
        from slim_ops.ops.masked_logprob.cuda import logprob_from_logits_bwd_cuda

        return logprob_from_logits_bwd_cuda(grad_logp, logits, labels, lse, temperature)
    if backend == "triton":
        from slim_ops.ops.masked_logprob.triton import logprob_from_logits_bwd_triton

        return logprob_from_logits_bwd_triton(grad_logp, logits, labels, lse, temperature)
    return _logprob_from_logits_bwd_torch(grad_logp, logits, labels, lse, temperature)


@_logprob_from_logits_bwd.register_fake
def _(grad_logp, logits, labels, lse, temperature, backend):
    return torch.empty_like(logits)


def _lfl_setup(ctx, inputs, output):
    logits, labels, temperature, _, backend = inputs
    _, lse, ent = output
    ctx.mark_non_differentiable(lse, ent)
    ctx.save_for_backward(logits, labels, lse)
    ctx.temperature, ctx.backend = temperature, backend


def _lfl_backward(ctx, grad_logp, grad_lse, grad_ent):
    logits, labels, lse = ctx.saved_tensors
    grad = _logprob_from_logits_bwd(grad_logp.contiguous(), logits, labels, lse, ctx.temperature, ctx.backend)
    return grad, None, None, None, None


_logprob_from_logits_fwd.register_autograd(_lfl_backward, setup_context=_lfl_setup)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_labels(op: str, labels, N: int, V: int, device) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != N:
        raise ValueError(f"{op}: labels must be a 1-D integer tensor of length N={N}, got "
                         f"{getattr(labels, 'shape', type(labels))}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: labels must be int64 or int32 token ids, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"{op}: labels are on {labels.device} but the inputs are on {device}")
    # range check only where it costs no device synchronisation
    if labels.device.type == "cpu" and N > 0 and not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"{op}: labels must lie in [0, V={V}), got values in [{lo}, {hi}]")


def _check_temperature(op: str, temperature) -> float:
    if not isinstance(temperature, (int, float)) or not float(temperature) > 0:
        raise ValueError(f"{op}: temperature must be a float > 0, got {temperature!r}")
    return float(temperature)


def masked_logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   temperature: float = 1.0, return_entropy: bool = False, backend: str | None = None):
    """Log-probability of each row's label under the LM head, without materialising [N, V].

    Args:
        hidden: [N, d] hidden states of the rows that need a log-prob (e.g. the masked positions of
            the noisy stream), fp32 / bf16 / fp16. Differentiable. Leading dimensions [..., d] are
            flattened (labels [...] then, outputs [...]).
        weight: [V, d] LM head (same dtype as ``hidden``). Differentiable.
        labels: [N] int64/int32 token ids in [0, V).
        temperature: T > 0; logits are z = hidden·weightᵀ / T.
        return_entropy: also return the entropy of softmax(z) per row (fp32, no gradient).
        backend: ``None`` (auto: triton on CUDA), ``"torch"`` or ``"triton"``.

    Returns:
        logp [N] fp32 = z_{i,y_i} − logsumexp_v z_{i,v}; with ``return_entropy`` the tuple (logp, entropy).
        The forward keeps only the per-row logsumexp; the backward recomputes logits tile by tile and
        returns dhidden / dweight in the input dtypes (accumulated in fp32).
    """
    op = "masked_logprob"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or hidden.dtype not in _FLOATS:
        raise ValueError(f"{op}: hidden must be a [N, d] fp32/bf16/fp16 tensor, got "
                         f"{getattr(hidden, 'shape', type(hidden))} {getattr(hidden, 'dtype', '')}")
    lead = hidden.shape[:-1]
    if hidden.dim() > 2:
        if not isinstance(labels, torch.Tensor) or labels.shape != lead:
            raise ValueError(f"{op}: hidden {tuple(hidden.shape)} needs labels of shape {tuple(lead)}, got "
                             f"{getattr(labels, 'shape', type(labels))}")
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{op}: weight must be a [V, d] tensor with d={hidden.shape[1]} like hidden, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{op}: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{op}: weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"{op}: V and d must be >= 1, got weight {tuple(weight.shape)}")
    _check_labels(op, labels, hidden.shape[0], weight.shape[0], hidden.device)
    temperature = _check_temperature(op, temperature)
    be = pick(op, hidden.device, backend, supported=("torch", "triton"))
    logp, _, ent = _masked_logprob_fwd(hidden.contiguous(), weight.contiguous(), labels.long().contiguous(),
                                       temperature, bool(return_entropy), be)
    if len(lead) != 1:
        logp = logp.reshape(lead)
        ent = ent.reshape(lead) if return_entropy else ent
    return (logp, ent) if return_entropy else logp


def logprob_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                        return_entropy: bool = False, backend: str | None = None):
    """Log-probability of each row's label from logits the caller already holds.

    Args:
        logits: [N, V] fp32 / bf16 / fp16 (differentiable); leading dimensions [..., V] are flattened.
        labels: [N] (or [...]) int64/int32 in [0, V).
        temperature: T > 0 (z = logits / T). return_entropy: also return the entropy (fp32, no grad).
        backend: ``None`` (auto: cuda > triton on CUDA), ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        logp [N] fp32 = z_{i,y_i} − logsumexp_v z_{i,v} (and entropy [N]); one pass over the logits,
        no fp32 copy of them. The gradient is dlogits = g·(onehot − softmax(z))/T in the logits dtype.
    """
    op = "logprob_from_logits"
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.dtype not in _FLOATS:
        raise ValueError(f"{op}: logits must be a [N, V] fp32/bf16/fp16 tensor, got "
                         f"{getattr(logits, 'shape', type(logits))} {getattr(logits, 'dtype', '')}")
    lead = logits.shape[:-1]
    if logits.dim() > 2:
        if not isinstance(labels, torch.Tensor) or labels.shape != lead:
            raise ValueError(f"{op}: logits {tuple(logits.shape)} need labels of shape {tuple(lead)}, got "
                             f"{getattr(labels, 'shape', type(labels))}")
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: V must be >= 1, got logits {tuple(logits.shape)}")
    _check_labels(op, labels, logits.shape[0], logits.shape[1], logits.device)
    temperature = _check_temperature(op, temperature)
    be = pick(op, logits.device, backend, supported=("torch", "triton", "cuda"))
    if logits.stride(1) != 1:  # rows may be strided (e.g. a vocabulary slice of padded logits); columns not
        logits = logits.contiguous()
    logp, _, ent = _logprob_from_logits_fwd(logits, labels.long().contiguous(), temperature,
                                            bool(return_entropy), be)
    if len(lead) != 1:
        logp = logp.reshape(lead)
        ent = ent.reshape(lead) if return_entropy else ent
    return (logp, ent) if return_entropy else logp
