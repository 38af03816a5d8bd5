"""Public block-diffusion attention: validation, backend choice, torch.library registration, autograd.

``o = block_diffusion_attention(q, k, v, layout, scale=None, backend=None)`` computes, per batch b and
query head h (key/value head ``h // (Hq/Hkv)``),

    o[b, h, i] = Σ_j softmax_j( scale · q[b,h,i]·k[b,h',j]  masked to allowed(i, j) ) · v[b,h',j]

where ``allowed`` is the predicate of ``layout`` (:class:`slim_ops.BlockLayout`, docs/attention.md). Forward and
backward are differentiable in q, k and v.

Registered ops (the layout travels as its integers plus the optional pad bitmap):

* ``slim_ops::block_diffusion_attention_torch`` / ``..._torch_bwd`` — fp32 SDPA with the dense mask,
  chunked over query rows (reference semantics, any D ≤ 256, CPU or GPU).
* ``slim_ops::block_diffusion_attention_triton`` → (o, lse) / ``..._triton_bwd`` — the flash kernels of
  ``triton.py`` (no mask tensor; logsumexp saved for the backward), ``triton_op`` + ``wrap_triton`` so
  ``torch.compile(fullgraph=True)`` sees the kernels.
"""

from __future__ import annotations

import math
import os

import torch

from slim_ops._backend import _has_triton, autocast_off, pick, triton_interpret
from slim_ops.layout import BlockLayout
from slim_ops.ops.attention.reference import attention_bwd_chunked, attention_fwd_chunked

__all__ = ["block_diffusion_attention"]

_OP = "block_diffusion_attention"
_BACKENDS = ("torch", "triton")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TORCH_MAX_D = 256


def _layout_from(
    prompt_pad: torch.Tensor | None,
    prompt_len: int,
    response_len: int,
    block_size: int,
    num_noisy: int,
    q_start: int,
) -> BlockLayout:
    return BlockLayout(
        prompt_len,
        response_len,
        block_size,
        num_noisy,
        q_start,
        None if prompt_pad is None else prompt_pad.bool(),
        "op",
    )


# ------------------------------------------------------------------------------------- torch backend


@torch.library.custom_op("slim_ops::block_diffusion_attention_torch", mutates_args=())
def _bda_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_pad: torch.Tensor | None,
    prompt_len: int,
    response_len: int,
    block_size: int,
    num_noisy: int,
    q_start: int,
    scale: float,
) -> torch.Tensor:
    layout = _layout_from(prompt_pad, prompt_len, response_len, block_size, num_noisy, q_start)
    return autocast_off(attention_fwd_chunked)(q, k, v, layout, scale)


@_bda_torch.register_fake
def _(q, k, v, prompt_pad, prompt_len, response_len, block_size, num_noisy, q_start, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("slim_ops::block_diffusion_attention_torch_bwd", mutates_args=())
def _bda_torch_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_pad: torch.Tensor | None,
    prompt_len: int,
    response_len: int,
    block_size: int,
    num_noisy: int,
    q_start: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _layout_from(prompt_pad, prompt_len, response_len, block_size, num_noisy, q_start)
    return autocast_off(attention_bwd_chunked)(do, q, k, v, layout, scale)


@_bda_torch_bwd.register_fake
def _(do, q, k, v, prompt_pad, prompt_len, response_len, block_size, num_noisy, q_start, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _bda_torch_setup(ctx, inputs, output):
    q, k, v, prompt_pad, prompt_len, response_len, block_size, num_noisy, q_start, scale = inputs
    ctx.save_for_backward(q, k, v, prompt_pad)
    ctx.layout_args = (prompt_len, response_len, block_size, num_noisy, q_start, scale)


def _bda_torch_backward(ctx, do):
    q, k, v, prompt_pad = ctx.saved_tensors
    dq, dk, dv = _bda_torch_bwd(do, q, k, v, prompt_pad, *ctx.layout_args)
    return dq, dk, dv, None, None, None, None, None, None, None


_bda_torch.register_autograd(_bda_torch_backward, setup_context=_bda_torch_setup)


# ------------------------------------------------------------------------------------- triton backend


def _launch(kernel):
    """wrap_triton for compiled GPU kernels; the interpreter's kernels are called directly (eager only)."""
    if triton_interpret():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


# Under the interpreter the kernels are plain Python: register opaque custom ops (torch.compile then calls
# them as a black box); on GPUs triton_op lets Inductor see and schedule the kernels. Without triton installed
# the op is registered opaque too (triton_op would log "Triton not available" at import).
_define = (torch.library.custom_op if triton_interpret() or not _has_triton()
           else torch.library.triton_op)


@_define("slim_ops::block_diffusion_attention_triton", mutates_args=())
def _bda_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_pad: torch.Tensor | None,
    first_valid: torch.Tensor | None,
    prompt_len: int,
    response_len: int,
    block_size: int,
    q_start: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from slim_ops.ops.attention.triton import bda_fwd

    return bda_fwd(
        q, k, v, prompt_pad, first_valid, prompt_len, response_len, block_size, q_start, scale, launch=_launch
    )


@_bda_triton.register_fake
def _(q, k, v, prompt_pad, first_valid, prompt_len, response_len, block_size, q_start, scale):
    B, Hq, Lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@_define("slim_ops::block_diffusion_attention_triton_bwd", mutates_args=())
def _bda_triton_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    prompt_pad: torch.Tensor | None,
    first_valid: torch.Tensor | None,
    prompt_len: int,
    response_len: int,
    block_size: int,
    q_start: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from slim_ops.ops.attention.triton import bda_bwd

    if do.stride(-1) != 1:
        do = do.contiguous()
    return bda_bwd(
        do,
        q,
        k,
        v,
        o,
        lse,
        prompt_pad,
        first_valid,
        prompt_len,
        response_len,
        block_size,
        q_start,
        scale,
        launch=_launch,
    )


@_bda_triton_bwd.register_fake
def _(do, q, k, v, o, lse, prompt_pad, first_valid, prompt_len, response_len, block_size, q_start, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _bda_triton_setup(ctx, inputs, output):
    q, k, v, prompt_pad, first_valid, prompt_len, response_len, block_size, q_start, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, prompt_pad, first_valid)
    ctx.layout_args = (prompt_len, response_len, block_size, q_start, scale)
    ctx.mark_non_differentiable(lse)


def _bda_triton_backward(ctx, do, dlse):
    q, k, v, o, lse, prompt_pad, first_valid = ctx.saved_tensors
    dq, dk, dv = _bda_triton_bwd(do, q, k, v, o, lse, prompt_pad, first_valid, *ctx.layout_args)
    return dq, dk, dv, None, None, None, None, None, None, None


_bda_triton.register_autograd(_bda_triton_backward, setup_context=_bda_triton_setup)


# ------------------------------------------------------------------------------------- public


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"block_diffusion_attention: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"block_diffusion_attention: {name} must be 4-D "
                f"({'[B, Hq, Lq, D]' if name == 'q' else '[B, Hkv, Lk, D]'}), got shape {tuple(t.shape)}"
            )
        if t.dtype not in _DTYPES:
            raise TypeError(f"block_diffusion_attention: {name} must be bf16, fp16 or fp32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"block_diffusion_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"block_diffusion_attention: q, k, v must be on one device, got {q.device}, {k.device}, "
            f"{v.device}"
        )
    if not isinstance(layout, BlockLayout):
        raise TypeError(
            f"block_diffusion_attention: layout must be a slim_ops.BlockLayout, got {type(layout).__name__}"
        )
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"block_diffusion_attention: k and v must have the same shape, got {tuple(k.shape)} "
            f"and {tuple(v.shape)}"
        )
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"block_diffusion_attention: k/v must be [B={B}, Hkv, Lk, D={D}] to match q "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"block_diffusion_attention: query heads ({Hq}) must be a multiple of key/value heads "
            f"({Hkv}) (GQA)"
        )
    if Lq != layout.num_queries or k.shape[2] != layout.num_keys:
        raise ValueError(
            f"block_diffusion_attention: {layout!r} expects Lq={layout.num_queries} queries and "
            f"Lk={layout.num_keys} keys, got q length {Lq} and k length {k.shape[2]}"
        )
    if layout.prompt_pad is not None and layout.batch_size not in (1, B):
        raise ValueError(
            f"block_diffusion_attention: the layout's pad bitmap has {layout.batch_size} rows; "
            f"expected 1 or B={B}"
        )


def block_diffusion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention under a block-diffusion layout (docs/attention.md), differentiable in q, k, v.

    Args:
        q: [B, Hq, Lq, D] with Lq = ``layout.num_queries``; bf16, fp16 or fp32 (any strides; the last
            dimension is made contiguous if it is not).
        k, v: [B, Hkv, Lk, D], Lk = ``layout.num_keys``, Hq % Hkv == 0 (GQA: head h reads h // (Hq/Hkv)).
        layout: a :class:`slim_ops.BlockLayout` (``train``, ``packed``, ``staircase`` or ``decode``); its
            pad bitmap, if any, has 1 or B rows.
        scale: softmax scale, default 1/sqrt(D).
        backend: "torch" (fp32 SDPA with the dense mask, chunked over queries — the key bitmap alone for
            decode steps; any D ≤ 256), "triton" (flash forward/backward, no mask tensor; D ∈ {64, 128} on
            GPUs; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; short query blocks without a noisy
            stream — decode steps, Lq ≤ 64 — take a decode forward that packs the G·Lq rows of each KV
            head into one tile and splits long caches) or None = auto (triton on CUDA when D ∈ {64, 128},
            else torch).

    Returns:
        o: [B, Hq, Lq, D] in q's dtype (contiguous),
        ``o = softmax(scale·q kᵀ masked to allowed pairs) v``; every row has ≥ 1 allowed key.
    """
    _validate(q, k, v, layout)
    B, Hq, Lq, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"block_diffusion_attention: scale must be a positive finite float, got {scale}")
    name = pick(_OP, q.device, backend, supported=_BACKENDS)
    if name == "triton" and backend is None and not os.environ.get("SLIM_OPS_BACKEND"):
        from slim_ops.ops.attention.triton import supported_head_dims

        if D not in supported_head_dims():  # auto: head dims the kernels are not built for use the reference
            name = "torch"
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    layout = layout.to(q.device)
    pad = layout.prompt_pad
    if name == "torch":
        if D > TORCH_MAX_D:
            raise ValueError(f"block_diffusion_attention: head dim D={D} > {TORCH_MAX_D} is not supported")
        return _bda_torch(
            q,
            k,
            v,
            pad,
            layout.prompt_len,
            layout.response_len,
            layout.block_size,
            layout.num_noisy,
            layout.q_start,
            scale,
        )
    from slim_ops.ops.attention.triton import supported_head_dims

    if D not in supported_head_dims():
        raise ValueError(
            f"block_diffusion_attention: the triton backend supports head dims {supported_head_dims()}, "
            f"got D={D}; use backend='torch' for other sizes"
        )
    if B * Hq > 65535:
        raise ValueError(f"block_diffusion_attention: the triton backend launches B*Hq programs on the second grid "
                         f"axis (at most 65535), got B*Hq = {B * Hq}; split the batch")
    first_valid = None
    if pad is not None:
        first_valid = layout.first_valid(q.device)
        pad = pad.to(torch.uint8)
        if pad.shape[0] != B:
            pad, first_valid = pad.expand(B, -1), first_valid.expand(B).contiguous()
    o, _ = _bda_triton(
        q,
        k,
        v,
        pad,
        first_valid,
        layout.prompt_len,
        layout.response_len,
        layout.block_size,
        layout.q_start,
        scale,
    )
    return o
