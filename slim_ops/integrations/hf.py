"""Run Hugging Face decoders (Qwen3 / Qwen2 / Llama-shaped: SDAR, Dream, ...) with block-diffusion attention.

The integration registers one attention function, ``"slim_block_diffusion"``, in transformers'
``AttentionInterface``. Every attention layer of a model switched to it calls
:func:`slim_ops.block_diffusion_attention` with the :class:`slim_ops.BlockLayout` of the current forward
call, so no N×N mask is built (on GPUs: the Triton kernel; on the CPU: the chunked torch reference).

Call pattern (the layout travels with each forward call)::

    import slim_ops
    from slim_ops.integrations import hf

    model.set_attn_implementation(hf.register())  # or from_pretrained(..., attn_implementation=hf.register())
    layout = slim_ops.BlockLayout.train(L0, L1, 16, prompt_pad=ids[:, :L0] == pad_id)
    out = model(input_ids=ids,                            # [B, L0 + 2·L1] = [prompt ‖ clean ‖ noisy]
                position_ids=layout.position_ids(),       # positions of docs/attention.md (noisy reuses clean)
                block_layout=layout)                      # forwarded by transformers to every attention layer

    # Models whose forward does not pass extra kwargs through (some remote-code models): set it for a scope
    with hf.block_layout(layout):
        out = model(input_ids=ids, position_ids=layout.position_ids())

    # Decode step with a KV cache: queries are the K slots of the current block, keys = cache + block
    out = model(input_ids=block_ids, past_key_values=cache, position_ids=pos,
                block_layout=slim_ops.BlockLayout.decode(cache_len, K))

A 2-D padding ``attention_mask`` is not used with a layout (transformers drops it for this attention
function): prompt pads belong in the layout (``prompt_pad`` / ``cache_pad``). Precomputed dense masks are
accepted too: with no layout, a 4-D ``attention_mask`` (bool [B|1, 1|H, Lq, Lk],
True = attend, or additive float) is handed to SDPA unchanged, which is exactly what the reference
trainer does. ``block_backend="torch" | "triton"`` (kwarg or :func:`block_layout` argument) forces a
slim_ops backend; the default picks the fastest for the tensors' device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from slim_ops.layout import BlockLayout
from slim_ops.ops.attention.op import block_diffusion_attention

__all__ = ["ATTN_NAME", "block_diffusion_attention_forward", "block_layout", "register"]

ATTN_NAME = "slim_block_diffusion"

_CURRENT: contextvars.ContextVar[tuple[BlockLayout, str | None] | None] = contextvars.ContextVar(
    "slim_ops_block_layout", default=None
)


@contextlib.contextmanager
def block_layout(layout: BlockLayout, backend: str | None = None) -> Iterator[BlockLayout]:
    """Use `layout` for every attention call in this scope that gets no ``block_layout=`` kwarg."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"block_layout: expected a slim_ops.BlockLayout, got {type(layout).__name__}")
    token = _CURRENT.set((layout, backend))
    try:
        yield layout
    finally:
        _CURRENT.reset(token)


def block_diffusion_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    block_layout: BlockLayout | None = None,
    block_backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] (GQA not
    repeated) → (attn_output [B, Lq, Hq, D], None)."""
    if dropout:
        raise ValueError(
            f"slim_block_diffusion attention does not implement attention dropout (got {dropout}); "
            "set config.attention_dropout = 0"
        )
    layout = block_layout
    if layout is None:
        current = _CURRENT.get()
        if current is not None:
            layout, ctx_backend = current
            block_backend = block_backend or ctx_backend
    if layout is not None:
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"block_layout must be a slim_ops.BlockLayout, got {type(layout).__name__}")
        dev = query.device.type
        if torch.is_autocast_enabled(dev):
            # mixed precision (fp32 weights, autocast compute): the projections' outputs arrive in mixed
            # dtypes (q/k through an fp32 norm, v straight from a linear); attention computes in the
            # autocast dtype, as SDPA does under autocast
            dt = torch.get_autocast_dtype(dev)
            query, key, value = query.to(dt), key.to(dt), value.to(dt)
        o = block_diffusion_attention(query, key, value, layout, scale=scaling, backend=block_backend)
        return o.transpose(1, 2).contiguous(), None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        G = query.shape[1] // key.shape[1]
        o = F.scaled_dot_product_attention(
            query,
            key.repeat_interleave(G, 1),
            value.repeat_interleave(G, 1),
            attn_mask=attention_mask,
            scale=scaling,
        )
        return o.transpose(1, 2).contiguous(), None
    raise ValueError(
        "slim_block_diffusion attention needs a layout: pass block_layout=BlockLayout... to the "
        "model's forward, use `with slim_ops.integrations.hf.block_layout(layout):`, or pass a "
        "precomputed 4-D attention_mask [B, 1, Lq, Lk]"
    )


def register(name: str = ATTN_NAME) -> str:
    """Register the attention function with transformers (idempotent); returns the implementation name
    to pass as ``attn_implementation`` / ``model.set_attn_implementation(name)``."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, block_diffusion_attention_forward)
    return name
