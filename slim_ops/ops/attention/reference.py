"""Block-diffusion attention in plain PyTorch: the executable spec and the ``torch`` backend.

``O = softmax(scale · Q Kᵀ + bias) V`` per (batch, query head), with ``bias = 0`` where
``layout.dense_mask()`` allows the pair and −∞ elsewhere; query head h reads key/value head
``h // (Hq / Hkv)`` (GQA). Every row has at least one allowed key (a fully masked row sees itself, see
docs/attention.md, 'The training layout'), so
the softmax is always defined.

* :func:`block_diffusion_attention_ref` — one dense fp32 pass (tests only: O(Lq·Lk) memory).
* :func:`attention_fwd_chunked` / :func:`attention_bwd_chunked` — the ``torch`` backend: fp32,
  chunked over query rows so that the mask and score chunks stay under ``budget_bytes``; the forward
  calls SDPA with the boolean mask of each chunk, the backward recomputes the chunk's probabilities
  and applies the softmax-attention gradient (dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(P ∘ dO Vᵀ)),
  dQ = scale · dS K, dK = scale · dSᵀ Q).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slim_ops.layout import BlockLayout

DEFAULT_BUDGET_BYTES = 256 * 2**20


def block_diffusion_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float | None = None
) -> torch.Tensor:
    """Dense fp32 reference. q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] → fp32 [B,Hq,Lq,D]. Differentiable."""
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    mask = layout.dense_mask(q.device)[:, None]  # [B or 1, 1, Lq, Lk]
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vf)


def sdpa_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float | None = None
) -> torch.Tensor:
    """What the reference trainer runs: SDPA with the dense boolean mask, in the inputs' dtype."""
    G = q.shape[1] // k.shape[1]
    mask = layout.dense_mask(q.device)[:, None]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask, scale=scale
    )


def _chunk_rows(B: int, Hq: int, Lq: int, Lk: int, budget_bytes: int) -> int:
    per_row = max(1, B * Hq * Lk * 4 * 3)  # scores, probabilities, one temporary (fp32)
    return max(1, min(Lq, budget_bytes // per_row))


def attention_fwd_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> torch.Tensor:
    """Forward of the torch backend: fp32 SDPA per query chunk with the chunk's dense mask.

    Returns a tensor shaped like q (contiguous) in q's dtype.
    """
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    kf, vf = k.float(), v.float()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    step = _chunk_rows(B, Hq, Lq, Lk, budget_bytes)
    key_ok = ~layout.key_padding(q.device)[:, None, None, :] if layout.pad_keys_only else None  # decode steps
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        mask = key_ok if key_ok is not None else layout.dense_mask(q.device, rows=(r0, r1))[:, None]
        o = F.scaled_dot_product_attention(
            q[:, :, r0:r1].float(), kf, vf, attn_mask=mask, scale=scale, enable_gqa=Hq != k.shape[1]
        )
        out[:, :, r0:r1] = o.to(q.dtype)
    return out


def attention_bwd_chunked(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the torch backend (fp32, chunked over query rows). Returns dq, dk, dv in the inputs'
    dtypes and shapes."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kf, vf = k.float(), v.float()  # [B, Hkv, Lk, D]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(B, Hkv, Lk, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, Hkv, Lk, D, dtype=torch.float32, device=q.device)
    step = _chunk_rows(B, Hq, Lq, Lk, budget_bytes)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        r = r1 - r0
        # the G query heads of one KV head are stacked along rows: [B, Hkv, G·r, D]
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, G * r, D)
        doc = do[:, :, r0:r1].float().reshape(B, Hkv, G * r, D)
        mask = layout.dense_mask(q.device, rows=(r0, r1))[:, None, None]  # [B or 1, 1, 1, r, Lk]
        s = torch.matmul(qc, kf.transpose(-1, -2)).view(B, Hkv, G, r, Lk) * scale
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).view(B, Hkv, G * r, Lk)
        dv += torch.matmul(p.transpose(-1, -2), doc)
        dp = torch.matmul(doc, vf.transpose(-1, -2))  # [B, Hkv, G·r, Lk]
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        dq[:, :, r0:r1] = (torch.matmul(ds, kf) * scale).view(B, Hq, r, D).to(q.dtype)
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq, dk.to(k.dtype), dv.to(v.dtype)
