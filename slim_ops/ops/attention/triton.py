"""Triton flash-attention forward and backward for block-diffusion layouts (docs/attention.md).

The mask is never stored. Each query row derives its allowed keys from (L0, L1, K, Lc = L0 + L1,
the stream position, the first non-pad prompt index) as two key intervals (see
``BlockLayout.row_intervals``): ``[a_lo, a_hi)`` on the prompt/clean side (prompt pads hidden unless
the row is self-only) and ``[b_lo, b_hi)`` = its own noisy block. A (row block, key tile) pair is
*skip* (no row touches the tile: never visited), *full* (every valid row sees every column and no
column is a pad: no masking) or *partial* (elementwise mask). The class of a key tile comes from
loop-invariant scalars of the row block (the key range every valid row sees whole) and one pad bit per
key tile, precomputed by the launcher (``_tile_pad_bits``), so the key loops hold no block-wide reduction.

Kernels:

* ``_bda_fwd_kernel`` — one (query tile, query head) per program: O and the log2-domain logsumexp.
* ``_bda_decode_kernel`` — short query blocks (Lq ≤ 64, no noisy stream: decode steps, short prefills):
  one program per (batch, KV head[, row tile][, KV split]) packs the G·Lq rows of the KV head's G query heads
  into the M dimension, so K/V are read once per KV head; long caches are split over programs and
  ``_bda_decode_merge_kernel`` merges the splits by their logsumexp (no atomics).
* ``_bda_bwd_preprocess_kernel`` (Δ = rowsum(dO ∘ O)), ``_bda_bwd_dkdv_kernel`` (one key tile of one KV
  head; one flat, software-pipelined loop over (query tile, query head) pairs of the row segments that
  see the tile: no atomics), ``_bda_bwd_dq_kernel``.

All (batch, head) offsets are int64.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slim_ops._aot import AotSpec, signature
from slim_ops._backend import triton_interpret

LOG2E = 1.4426950408889634
_BIG: tl.constexpr = tl.constexpr(2**30)


@triton.jit
def _bda_row_intervals(o_q, m_q, L0, L1, K, Lc, fv, HAS_PAD: tl.constexpr):
    """Allowed key intervals of absolute query positions o_q [BM]; invalid rows get empty intervals."""
    is_p = o_q < L0
    is_x = o_q >= Lc
    r = tl.maximum(L0 - 1 - o_q, 0) // K
    i_c = tl.maximum(o_q - L0, 0)
    ctx_hi = tl.where(is_p, L0 - r * K, L0 + tl.minimum((i_c // K + 1) * K, L1))
    t = tl.maximum(o_q - Lc, 0)
    s = t // L1
    bq = (t - s * L1) // K
    a_hi = tl.where(is_x, L0 + bq * K, ctx_hi)
    b_lo = tl.where(is_x, Lc + s * L1 + bq * K, 0)
    b_hi = tl.where(is_x, Lc + s * L1 + tl.minimum((bq + 1) * K, L1), 0)
    a_lo = tl.zeros_like(o_q)
    if HAS_PAD:
        self_only = is_p & (ctx_hi <= fv)
        a_lo = tl.where(self_only, o_q, a_lo)
        a_hi = tl.where(self_only, o_q + 1, a_hi)
    else:
        self_only = o_q < 0
    a_hi = tl.where(m_q, a_hi, 0)
    b_hi = tl.where(m_q, b_hi, 0)
    return a_lo, a_hi, b_lo, b_hi, self_only


@triton.jit
def _bda_block_bounds(m_q, a_lo, a_hi, b_lo, b_hi):
    """Loop-invariant scalars of a row block (computed once, before the key loops).

    Returns (lo_a, hi_a, lo_b, hi_b): the hulls of the rows' a and b intervals (the key ranges to visit),
    and (fa_lo, fa_hi, fb_lo, fb_hi): the key ranges that *every* valid row sees, so that key tile
    [n0, n0+BN) is full iff ``n0 ≥ fa_lo ∧ n0+BN ≤ fa_hi ∧ no pad in the tile`` or ``n0 ≥ fb_lo ∧ n0+BN ≤ fb_hi``
    (a ⊂ [0, Lc) and b ⊂ [Lc, Lk) are disjoint, so this is exact: a tile inside [0, Lc) is whole in a row
    only through a, one inside [Lc, Lk) only through b).
    """
    lo_a = tl.min(tl.where(m_q, a_lo, _BIG), axis=0)
    hi_a = tl.max(a_hi, axis=0)
    lo_b = tl.min(tl.where(b_hi > b_lo, b_lo, _BIG), axis=0)
    hi_b = tl.max(b_hi, axis=0)
    fa_lo = tl.max(tl.where(m_q, a_lo, 0), axis=0)
    fa_hi = tl.min(tl.where(m_q, a_hi, _BIG), axis=0)
    fb_lo = tl.max(tl.where(m_q, b_lo, 0), axis=0)
    fb_hi = tl.min(tl.where(m_q, b_hi, _BIG), axis=0)
    return lo_a, hi_a, lo_b, hi_b, fa_lo, fa_hi, fb_lo, fb_hi


@triton.jit
def _bda_tile_is_full(n0, fa_lo, fa_hi, fb_lo, fb_hi, p_tpad, L0, BN: tl.constexpr, HAS_PAD: tl.constexpr):
    """Scalar class of key tile [n0, n0+BN) (n0 a multiple of BN): True = full (no mask needed)."""
    full_a = (n0 >= fa_lo) & (n0 + BN <= fa_hi)
    if HAS_PAD:
        tpad = tl.load(p_tpad + n0 // BN, mask=n0 < L0, other=0)
        full_a = full_a & (tpad == 0)
    return full_a | ((n0 >= fb_lo) & (n0 + BN <= fb_hi))


@triton.jit
def _bda_pad_bits(p_pad, n0, L0, BN: tl.constexpr, HAS_PAD: tl.constexpr):
    """int32 [BN]: 1 where key n0 + j is a prompt pad (zeros without a pad bitmap)."""
    o_n = n0 + tl.arange(0, BN)
    if HAS_PAD:
        b_pad = tl.load(p_pad + o_n, mask=o_n < L0, other=0).to(tl.int32)
    else:
        b_pad = tl.zeros([BN], dtype=tl.int32)
    return b_pad


@triton.jit
def _bda_tile_mask(n0, a_lo, a_hi, b_lo, b_hi, self_only, b_pad, BN: tl.constexpr, HAS_PAD: tl.constexpr):
    """bool [BM, BN]: the elementwise predicate on one tile (b_pad: its pad bits, see _bda_pad_bits)."""
    o_n = n0 + tl.arange(0, BN)
    m_a = (o_n[None, :] >= a_lo[:, None]) & (o_n[None, :] < a_hi[:, None])
    if HAS_PAD:
        m_a = m_a & ((b_pad[None, :] == 0) | self_only[:, None])
    m_b = (o_n[None, :] >= b_lo[:, None]) & (o_n[None, :] < b_hi[:, None])
    return m_a | m_b


@triton.jit
def _bda_kv_bases(Kp, V, PAD, TPAD, FV, i_b, i_hk, stride_kb, stride_kh, stride_vb, stride_vh, stride_pb, stride_tb,
                  HAS_PAD: tl.constexpr):
    """Base pointers of batch i_b / KV head i_hk's keys, values, pad bits and tile pad bits; first valid key."""
    p_kb = Kp + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_vb = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_pad = PAD + i_b.to(tl.int64) * stride_pb
    p_tpad = TPAD + i_b.to(tl.int64) * stride_tb
    if HAS_PAD:
        fv = tl.load(FV + i_b)
    else:
        fv = 0
    return p_kb, p_vb, p_pad, p_tpad, fv


@triton.jit
def _bda_fwd_tile(b_acc, b_m, b_l, b_q, p_kb, p_vb, n0, Lk, stride_kn, stride_vn, full,
                  a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE: tl.constexpr, D: tl.constexpr,
                  BD: tl.constexpr, BN: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
                  PREC: tl.constexpr):
    # unconditional K/V loads (the loop ranges only visit tiles some row needs) so the loop software-pipelines
    o_n = n0 + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_kv = (o_n < Lk)[:, None] & (o_d < D)[None, :]
    b_k = tl.load(p_kb + o_n[:, None] * stride_kn + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    b_v = tl.load(p_vb + o_n[:, None] * stride_vn + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * QK_SCALE  # [BM, BN]
    if not full:
        b_pad = _bda_pad_bits(p_pad, n0, L0, BN, HAS_PAD)
        b_mask = _bda_tile_mask(n0, a_lo, a_hi, b_lo, b_hi, self_only, b_pad, BN, HAS_PAD)
        b_s = tl.where(b_mask, b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_mu = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_alpha = tl.exp2(b_m - b_mu)
    b_p = tl.exp2(b_s - b_mu[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    b_m = b_mn
    return b_acc, b_m, b_l


@triton.jit
def _bda_fwd_kernel(Q, Kp, V, O, LSE, PAD, TPAD, FV,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_pb, stride_tb,
                    Hq, G, Lq, Lk, L0, L1, K, q_start,
                    QK_SCALE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // G
    Lc = L0 + L1
    o_m = i_m * BM + tl.arange(0, BM)
    m_q = o_m < Lq
    o_q = o_m + q_start
    p_q = tl.make_block_ptr(Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh, (Lq, D),
                            (stride_qm, 1), (i_m * BM, 0), (BM, BD), (1, 0))
    b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")  # [BM, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)
    p_kb, p_vb, p_pad, p_tpad, fv = _bda_kv_bases(Kp, V, PAD, TPAD, FV, i_b, i_hk, stride_kb, stride_kh, stride_vb,
                                                  stride_vh, stride_pb, stride_tb, HAS_PAD)
    a_lo, a_hi, b_lo, b_hi, self_only = _bda_row_intervals(o_q, m_q, L0, L1, K, Lc, fv, HAS_PAD)
    lo_a, hi_a, lo_b, hi_b, fa_lo, fa_hi, fb_lo, fb_hi = _bda_block_bounds(m_q, a_lo, a_hi, b_lo, b_hi)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    for n0 in range((tl.minimum(lo_a, hi_a) // BN) * BN, hi_a, BN):
        full = _bda_tile_is_full(n0, fa_lo, fa_hi, fb_lo, fb_hi, p_tpad, L0, BN, HAS_PAD)
        b_acc, b_m, b_l = _bda_fwd_tile(b_acc, b_m, b_l, b_q, p_kb, p_vb, n0, Lk, stride_kn, stride_vn, full,
                                        a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE, D, BD, BN,
                                        HAS_PAD, UPCAST, PREC)
    start_b = tl.maximum((tl.minimum(lo_b, hi_b) // BN) * BN, ((hi_a + BN - 1) // BN) * BN)
    for n0 in range(start_b, hi_b, BN):
        full = _bda_tile_is_full(n0, fa_lo, fa_hi, fb_lo, fb_hi, p_tpad, L0, BN, HAS_PAD)
        b_acc, b_m, b_l = _bda_fwd_tile(b_acc, b_m, b_l, b_q, p_kb, p_vb, n0, Lk, stride_kn, stride_vn, full,
                                        a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE, D, BD, BN,
                                        HAS_PAD, UPCAST, PREC)
    b_ls = tl.where(m_q, b_l, 1.0)
    b_o = b_acc / b_ls[:, None]
    p_o = tl.make_block_ptr(O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh, (Lq, D),
                            (stride_om, 1), (i_m * BM, 0), (BM, BD), (1, 0))
    tl.store(p_o, b_o.to(O.dtype.element_ty), boundary_check=(0, 1))
    tl.store(LSE + i_bh.to(tl.int64) * Lq + o_m, b_m + tl.log2(b_ls), mask=m_q)


@triton.jit
def _bda_decode_kernel(Q, Kp, V, O, LSE, PAD, TPAD, FV,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_os, stride_ls,
                       stride_pb, stride_tb,
                       Hq, Hkv, G, Lq, Lk, L0, L1, K, q_start, n_mt, tiles_per_split,
                       QK_SCALE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Rows r = g·Lq + i of one KV head's G query heads (head i_hk·G + g, query i) packed into M.

    Program (split s, row tile t) of (batch b, KV head): key tiles [s·tiles_per_split, (s+1)·tiles_per_split)
    of the rows' hull. Writes the normalised O and the log2 logsumexp of its split at split offset
    s·stride_os / s·stride_ls (rows without an allowed key in the split: O = 0, lse = −∞).
    """
    pid = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_s = pid // n_mt
    i_t = pid - i_s * n_mt
    i_b = i_bh // Hkv
    i_hk = i_bh - i_b * Hkv
    Lc = L0 + L1
    r = i_t * BM + tl.arange(0, BM)
    m_q = r < G * Lq
    g = r // Lq
    i_q = r - g * Lq
    i_h = i_hk * G + g
    o_d = tl.arange(0, BD)
    m_qd = m_q[:, None] & (o_d < D)[None, :]
    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh + i_q.to(tl.int64) * stride_qm
    b_q = tl.load(p_q[:, None] + o_d[None, :], mask=m_qd, other=0.0)  # [BM, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)
    p_kb, p_vb, p_pad, p_tpad, fv = _bda_kv_bases(Kp, V, PAD, TPAD, FV, i_b, i_hk, stride_kb, stride_kh, stride_vb,
                                                  stride_vh, stride_pb, stride_tb, HAS_PAD)
    a_lo, a_hi, b_lo, b_hi, self_only = _bda_row_intervals(i_q + q_start, m_q, L0, L1, K, Lc, fv, HAS_PAD)
    lo_a, hi_a, lo_b, hi_b, fa_lo, fa_hi, fb_lo, fb_hi = _bda_block_bounds(m_q, a_lo, a_hi, b_lo, b_hi)
    # the hull of all rows' keys (the launcher only sends layouts without noisy streams: b is empty)
    lo = tl.minimum(tl.minimum(lo_a, hi_a), tl.minimum(lo_b, hi_b)) // BN
    hi = (tl.maximum(hi_a, hi_b) + BN - 1) // BN
    t0 = tl.maximum(lo, i_s * tiles_per_split)
    t1 = tl.minimum(hi, (i_s + 1) * tiles_per_split)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    for n0 in range(t0 * BN, t1 * BN, BN):
        full = _bda_tile_is_full(n0, fa_lo, fa_hi, fb_lo, fb_hi, p_tpad, L0, BN, HAS_PAD)
        b_acc, b_m, b_l = _bda_fwd_tile(b_acc, b_m, b_l, b_q, p_kb, p_vb, n0, Lk, stride_kn, stride_vn, full,
                                        a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE, D, BD, BN,
                                        HAS_PAD, UPCAST, PREC)
    b_ls = tl.where(b_l > 0, b_l, 1.0)
    b_o = b_acc / b_ls[:, None]
    o_row = i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + i_q.to(tl.int64) * stride_om
    tl.store(O + i_s.to(tl.int64) * stride_os + o_row[:, None] + o_d[None, :], b_o.to(O.dtype.element_ty),
             mask=m_qd)
    o_lse = (i_b * Hq + i_h).to(tl.int64) * Lq + i_q
    tl.store(LSE + i_s.to(tl.int64) * stride_ls + o_lse, b_m + tl.log2(b_ls), mask=m_q)


@triton.jit
def _bda_decode_merge_kernel(OP, LP, O, LSE, stride_os, stride_ls, stride_ob, stride_oh, stride_om,
                             Hq, Lq, S, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """Merge S split partials (normalised O, log2 lse; contiguous [S, B, Hq, Lq(, D)]) by their logsumexp."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh - i_b * Hq
    o_m = i_m * BM + tl.arange(0, BM)
    m_q = o_m < Lq
    o_d = tl.arange(0, BD)
    m_qd = m_q[:, None] & (o_d < D)[None, :]
    p_l = LP + i_bh.to(tl.int64) * Lq + o_m
    p_o = OP + i_bh.to(tl.int64) * Lq * D + o_m[:, None] * D + o_d[None, :]
    b_mx = tl.full([BM], float("-inf"), dtype=tl.float32)
    for s in range(0, S):
        b_mx = tl.maximum(b_mx, tl.load(p_l + s * stride_ls, mask=m_q, other=float("-inf")))
    b_mu = tl.where(b_mx == float("-inf"), 0.0, b_mx)
    b_den = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    for _ in range(0, S):
        b_w = tl.exp2(tl.load(p_l, mask=m_q, other=float("-inf")) - b_mu)
        b_den += b_w
        b_acc += b_w[:, None] * tl.load(p_o, mask=m_qd, other=0.0)
        p_l += stride_ls
        p_o += stride_os
    b_den = tl.where(m_q, b_den, 1.0)
    p_out = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(p_out + o_m[:, None] * stride_om + o_d[None, :], (b_acc / b_den[:, None]).to(O.dtype.element_ty),
             mask=m_qd)
    tl.store(LSE + i_bh.to(tl.int64) * Lq + o_m, b_mu + tl.log2(b_den), mask=m_q)


@triton.jit
def _bda_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                               Hq, Lq, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    o_m = i_m * BM + tl.arange(0, BM)
    p_o = tl.make_block_ptr(O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh, (Lq, D),
                            (stride_om, 1), (i_m * BM, 0), (BM, BD), (1, 0))
    p_do = tl.make_block_ptr(DO + i_b.to(tl.int64) * stride_db + i_h.to(tl.int64) * stride_dh, (Lq, D),
                             (stride_dm, 1), (i_m * BM, 0), (BM, BD), (1, 0))
    b_o = tl.load(p_o, boundary_check=(0, 1), padding_option="zero").to(tl.float32)  # [BM, BD]
    b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero").to(tl.float32)  # [BM, BD]
    tl.store(DELTA + i_bh.to(tl.int64) * Lq + o_m, tl.sum(b_o * b_do, axis=1), mask=o_m < Lq)


@triton.jit
def _bda_ctx_block_start(n, L0, K):
    """First position of the P∪C block holding position n < Lc (prompt blocks are right-aligned to L0)."""
    return tl.where(n < L0, tl.maximum(L0 - (tl.maximum(L0 - 1 - n, 0) // K + 1) * K, 0),
                    L0 + (tl.maximum(n - L0, 0) // K) * K)


@triton.jit
def _bda_bwd_dkdv_kernel(Q, Kp, V, DO, LSE, DELTA, DK, DV, PAD, FV,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                         stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_pb,
                         Hq, Hkv, G, Lq, Lk, L0, L1, K, q_start,
                         QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
                         PREC: tl.constexpr):
    """dK, dV of key tile [n0, n0+BN) of one KV head.

    The query rows that see the tile form at most 1 + n segments (absolute positions): the P∪C rows
    [qs_c, Lc) and, in each noisy stream s, the rows [Lc + s·L1 + x_lo, Lc + s·L1 + x_hi) (all streams for a
    context tile, the streams s0..s1 holding the tile's keys for a noisy tile). One flat loop runs over
    (row tile of a segment, query head) pairs, so the whole backward of the tile is one software-pipelined
    loop. Rows from ``rf`` on in a segment see the whole tile (no mask; a scalar test per iteration).
    """
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hkv
    i_hk = i_bh % Hkv
    Lc = L0 + L1
    n0 = i_n * BN
    p_k = tl.make_block_ptr(Kp + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh, (Lk, D),
                            (stride_kn, 1), (n0, 0), (BN, BD), (1, 0))
    p_v = tl.make_block_ptr(V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh, (Lk, D),
                            (stride_vn, 1), (n0, 0), (BN, BD), (1, 0))
    b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")  # [BN, BD]
    b_v = tl.load(p_v, boundary_check=(0, 1), padding_option="zero")  # [BN, BD]
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    p_pad = PAD + i_b.to(tl.int64) * stride_pb
    b_pad = _bda_pad_bits(p_pad, n0, L0, BN, HAS_PAD)  # loop-invariant
    if HAS_PAD:
        fv = tl.load(FV + i_b)
        nopad = tl.max(b_pad, axis=0) == 0
    else:
        fv = 0
        nopad = n0 >= 0
    nl = tl.minimum(n0 + BN, Lk) - 1
    has_ctx = n0 < Lc
    pure_ctx = (nl < Lc) & nopad
    # P∪C segment: rows whose block is at or after the tile's first key's block; whole from the last key's block
    qs_c = tl.maximum(_bda_ctx_block_start(n0, L0, K), q_start)
    len_c = tl.where(has_ctx, tl.maximum(Lc - qs_c, 0), 0)
    qf_c = tl.where(pure_ctx, _bda_ctx_block_start(nl, L0, K), _BIG)
    n_x = (Lk - Lc) // L1
    # noisy segments of a context tile: every stream, rows of the blocks after the first key's block
    x_lo_c = tl.where((n0 < L0) | (nl >= Lc), 0, tl.minimum((tl.maximum(n0 - L0, 0) // K + 1) * K, L1))
    xf_c = tl.where(nl < L0, 0, (tl.maximum(nl - L0, 0) // K + 1) * K)
    # noisy segments of a noisy tile: its own blocks in the streams s0..s1 it spans
    tx0 = tl.maximum(n0 - Lc, 0)
    s0 = tx0 // L1
    xo0 = tx0 - s0 * L1
    tx1 = tl.maximum(nl - Lc, 0)
    s1 = tx1 // L1
    xo1 = tx1 - s1 * L1
    one = s0 == s1
    x_lo_n = tl.where(one, (xo0 // K) * K, 0)
    x_hi_n = tl.where(one, tl.minimum((xo1 // K + 1) * K, L1), L1)
    xf_n = tl.where(one & (xo0 // K == xo1 // K), x_lo_n, _BIG)
    s_a = tl.where(has_ctx, 0, s0)
    n_seg = tl.where(has_ctx, n_x, s1 - s0 + 1)
    x_lo = tl.where(has_ctx, x_lo_c, x_lo_n)
    x_hi = tl.where(has_ctx, L1, x_hi_n)
    xf = tl.where(has_ctx, tl.where(pure_ctx, xf_c, _BIG), xf_n)
    t_c = (len_c + BM - 1) // BM
    t_x = (tl.maximum(x_hi - x_lo, 0) + BM - 1) // BM
    t_xs = tl.maximum(t_x, 1)
    n_it = (t_c + n_seg * t_x) * G
    o_d = tl.arange(0, BD)
    p_qb = Q + i_b.to(tl.int64) * stride_qb
    p_dob = DO + i_b.to(tl.int64) * stride_db
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    for it in range(0, n_it):
        t = it // G
        i_g = it - t * G
        in_c = t < t_c
        u = tl.maximum(t - t_c, 0)
        sx = u // t_xs
        base = Lc + (s_a + sx) * L1
        r0 = tl.where(in_c, qs_c + t * BM, base + x_lo + (u - sx * t_xs) * BM)
        r1 = tl.where(in_c, Lc, base + x_hi)
        full = r0 >= tl.where(in_c, qf_c, base + xf)
        o_m = r0 - q_start + tl.arange(0, BM)
        m_q = (o_m >= 0) & (o_m < tl.minimum(r1 - q_start, Lq))
        m_qd = m_q[:, None] & (o_d < D)[None, :]
        i_h = i_hk * G + i_g
        i_bhq = (i_b * Hq + i_h).to(tl.int64)
        b_q = tl.load(p_qb + i_h.to(tl.int64) * stride_qh + o_m[:, None] * stride_qm + o_d[None, :], mask=m_qd,
                      other=0.0)  # [BM, BD]
        b_do = tl.load(p_dob + i_h.to(tl.int64) * stride_dh + o_m[:, None] * stride_dm + o_d[None, :], mask=m_qd,
                       other=0.0)  # [BM, BD]
        if UPCAST:
            b_q = b_q.to(tl.float32)
            b_do = b_do.to(tl.float32)
        b_lse = tl.load(LSE + i_bhq * Lq + o_m, mask=m_q, other=0.0)
        b_delta = tl.load(DELTA + i_bhq * Lq + o_m, mask=m_q, other=0.0)
        b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * QK_SCALE - b_lse[None, :])  # [BN, BM]
        if not full:
            a_lo, a_hi, b_lo, b_hi, self_only = _bda_row_intervals(o_m + q_start, m_q, L0, L1, K, Lc, fv, HAS_PAD)
            b_mask_t = tl.trans(_bda_tile_mask(n0, a_lo, a_hi, b_lo, b_hi, self_only, b_pad, BN, HAS_PAD))
            b_pt = tl.where(b_mask_t, b_pt, 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)  # [BN, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    p_dk = tl.make_block_ptr(DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh, (Lk, D),
                             (stride_dkn, 1), (n0, 0), (BN, BD), (1, 0))
    p_dv = tl.make_block_ptr(DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh, (Lk, D),
                             (stride_dvn, 1), (n0, 0), (BN, BD), (1, 0))
    tl.store(p_dk, (b_dk * SM_SCALE).to(DK.dtype.element_ty), boundary_check=(0, 1))
    tl.store(p_dv, b_dv.to(DV.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _bda_bwd_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, p_kb, p_vb, n0, Lk, stride_kn, stride_vn, full,
                     a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE: tl.constexpr, D: tl.constexpr,
                     BD: tl.constexpr, BN: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
                     PREC: tl.constexpr):
    o_n = n0 + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_kv = (o_n < Lk)[:, None] & (o_d < D)[None, :]
    b_k = tl.load(p_kb + o_n[:, None] * stride_kn + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    b_v = tl.load(p_vb + o_n[:, None] * stride_vn + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BM, BN]
    b_p = tl.exp2(b_s * QK_SCALE - b_lse[:, None])
    if not full:
        b_pad = _bda_pad_bits(p_pad, n0, L0, BN, HAS_PAD)
        b_mask = _bda_tile_mask(n0, a_lo, a_hi, b_lo, b_hi, self_only, b_pad, BN, HAS_PAD)
        b_p = tl.where(b_mask, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    return b_dq


@triton.jit
def _bda_bwd_dq_kernel(Q, Kp, V, DO, LSE, DELTA, DQ, PAD, TPAD, FV,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                       stride_dqb, stride_dqh, stride_dqm, stride_pb, stride_tb,
                       Hq, G, Lq, Lk, L0, L1, K, q_start,
                       QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
                       PREC: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // G
    Lc = L0 + L1
    o_m = i_m * BM + tl.arange(0, BM)
    m_q = o_m < Lq
    p_q = tl.make_block_ptr(Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh, (Lq, D),
                            (stride_qm, 1), (i_m * BM, 0), (BM, BD), (1, 0))
    p_do = tl.make_block_ptr(DO + i_b.to(tl.int64) * stride_db + i_h.to(tl.int64) * stride_dh, (Lq, D),
                             (stride_dm, 1), (i_m * BM, 0), (BM, BD), (1, 0))
    b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")  # [BM, BD]
    b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")  # [BM, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    b_lse = tl.load(LSE + i_bh.to(tl.int64) * Lq + o_m, mask=m_q, other=0.0)
    b_delta = tl.load(DELTA + i_bh.to(tl.int64) * Lq + o_m, mask=m_q, other=0.0)
    p_kb, p_vb, p_pad, p_tpad, fv = _bda_kv_bases(Kp, V, PAD, TPAD, FV, i_b, i_hk, stride_kb, stride_kh, stride_vb,
                                                  stride_vh, stride_pb, stride_tb, HAS_PAD)
    a_lo, a_hi, b_lo, b_hi, self_only = _bda_row_intervals(o_m + q_start, m_q, L0, L1, K, Lc, fv, HAS_PAD)
    lo_a, hi_a, lo_b, hi_b, fa_lo, fa_hi, fb_lo, fb_hi = _bda_block_bounds(m_q, a_lo, a_hi, b_lo, b_hi)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range((tl.minimum(lo_a, hi_a) // BN) * BN, hi_a, BN):
        full = _bda_tile_is_full(n0, fa_lo, fa_hi, fb_lo, fb_hi, p_tpad, L0, BN, HAS_PAD)
        b_dq = _bda_bwd_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, p_kb, p_vb, n0, Lk, stride_kn, stride_vn,
                                full, a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE, D, BD, BN,
                                HAS_PAD, UPCAST, PREC)
    start_b = tl.maximum((tl.minimum(lo_b, hi_b) // BN) * BN, ((hi_a + BN - 1) // BN) * BN)
    for n0 in range(start_b, hi_b, BN):
        full = _bda_tile_is_full(n0, fa_lo, fa_hi, fb_lo, fb_hi, p_tpad, L0, BN, HAS_PAD)
        b_dq = _bda_bwd_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, p_kb, p_vb, n0, Lk, stride_kn, stride_vn,
                                full, a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE, D, BD, BN,
                                HAS_PAD, UPCAST, PREC)
    p_dq = tl.make_block_ptr(DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh, (Lq, D),
                             (stride_dqm, 1), (i_m * BM, 0), (BM, BD), (1, 0))
    tl.store(p_dq, (b_dq * SM_SCALE).to(DQ.dtype.element_ty), boundary_check=(0, 1))


# ------------------------------------------------------------------------------------------- launchers

SUPPORTED_D = (64, 128)  # compiled (AOT_SPECS) head dims on GPUs
SUPPORTED_D_INTERPRET = (16, 32, 64, 128)  # the interpreter also runs the small test head dims
DECODE_MAX_LQ = 64  # query blocks up to this length without a noisy stream take the decode kernel


def supported_head_dims() -> tuple[int, ...]:
    return SUPPORTED_D_INTERPRET if triton_interpret() else SUPPORTED_D


# (kind, D) -> tiles, chosen from the sm_90a compile (python -m slim_ops._aot): every tensor-core product is a
# wgmma of N >= 32, no configuration spills, and the two warpgroups of 8 warps split M (each owns 64 whole rows:
# a 64-row M tile would split N between them, whose softmax / dS operands then cross warpgroups through shared
# memory with ~5 more barriers per iteration). dK/dV: M = BN keys, N = BM query rows (32); dQ: M = BM, N = BN.
_GPU_CONFIGS: dict[tuple[str, int], dict[str, int]] = {
    ("fwd", 128): {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
    ("dkdv", 128): {"BM": 32, "BN": 128, "num_warps": 8, "num_stages": 3},
    ("dq", 128): {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 2},
    ("fwd", 64): {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
    ("dkdv", 64): {"BM": 32, "BN": 128, "num_warps": 8, "num_stages": 2},
    ("dq", 64): {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
}
# decode: M tile = the packed G·Lq rows (64 or 128; wgmma needs M = 64 per warpgroup)
_DECODE_CONFIGS: dict[int, dict[str, int]] = {
    64: {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
    128: {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
}
# fp32 inputs use exact (ieee) dots without tensor cores: the exactness path, with small tiles
_FP32_CONFIGS: dict[str, dict[str, int]] = {
    "fwd": {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 2},
    "dkdv": {"BM": 16, "BN": 32, "num_warps": 8, "num_stages": 2},
    "dq": {"BM": 16, "BN": 16, "num_warps": 4, "num_stages": 2},  # BM=32 / 8 warps: an 8-byte stack frame at D=128
    "decode": {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 2},
}
_MERGE_CONFIG = {"BM": 16, "num_warps": 4, "num_stages": 1}


def _config(D: int, kind: str, interpret: bool | None = None, fp32: bool = False, rows: int = 64) -> dict[str, int]:
    """Tile sizes / warps per kernel; the interpreter uses 16×16 tiles to exercise many tiles cheaply.
    `rows` (decode): the packed G·Lq rows of one KV head."""
    if triton_interpret() if interpret is None else interpret:
        return {"BM": 16, "BN": 16, "num_warps": 4, "num_stages": 1}
    if kind == "pre":
        return {"BM": 64, "num_warps": 4, "num_stages": 1}
    if kind == "merge":
        return dict(_MERGE_CONFIG)
    if fp32:
        return dict(_FP32_CONFIGS[kind])
    if kind == "decode":
        return dict(_DECODE_CONFIGS[64 if rows <= 64 else 128])
    return dict(_GPU_CONFIGS[(kind, 128 if D > 64 else 64)])


def _out(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests replace it with a NaN-filled allocator)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _int32_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows are addressed as int64 (batch, head) base + int32 row offset (keeps the pipelined loops' address
    tiles 32-bit); a view whose per-head row span does not fit int32 is made contiguous."""
    if (t.shape[2] - 1) * t.stride(2) + t.shape[3] >= 2**31:
        return t.contiguous()
    return t


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The interpreter rounds fp32 → bf16/fp16 stores by truncation; there the kernels store fp32 and torch
    rounds to nearest afterwards (a no-op copy-free path on GPUs, where the kernel stores the dtype itself)."""
    return torch.float32 if triton_interpret() else dtype


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _pad_args(pad: torch.Tensor | None, first_valid: torch.Tensor | None, device: torch.device):
    if pad is None:
        dummy = torch.zeros(1, dtype=torch.uint8, device=device)
        return dummy, torch.zeros(1, dtype=torch.int32, device=device), 0, False
    return pad, first_valid, pad.stride(0), True


def _tile_pad_bits(pad: torch.Tensor | None, BN: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """uint8 [B', ⌈L0/BN⌉]: 1 where key tile t (keys [t·BN, (t+1)·BN)) holds a prompt pad, and its row stride.
    Two small device ops per call (no host synchronisation); the kernels read one bit per key tile."""
    if pad is None:
        return torch.zeros(1, dtype=torch.uint8, device=device), 0
    B, L0 = pad.shape
    src = pad[:1] if pad.stride(0) == 0 else pad  # a broadcast bitmap: one row, broadcast again
    nt = max(1, triton.cdiv(L0, BN))
    bits = F.pad(src, (0, nt * BN - L0)).view(src.shape[0], nt, BN).amax(dim=2)
    return bits, (0 if pad.stride(0) == 0 else nt)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_splits(programs: int, n_tiles: int, device: torch.device) -> int:
    """KV splits per (batch, KV head, row tile): enough programs for ~2 waves, each split ≥ 2 key tiles (≥ 1
    under the interpreter, which pretends to have 4 SMs so that the tests exercise the merge)."""
    if triton_interpret() or device.type != "cuda":
        sms, min_tiles = 4, 1
    else:
        sms, min_tiles = _sm_count(device.index if device.index is not None else torch.cuda.current_device()), 2
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, n_tiles // min_tiles))


def use_decode_kernel(Lq: int, Lk: int, L0: int, L1: int) -> bool:
    """The automatic choice: short query blocks (Lq ≤ 64) of layouts without a noisy stream (decode, short
    prefills), whose rows' keys are one interval per row."""
    return Lq <= DECODE_MAX_LQ and Lk == L0 + L1


def bda_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pad: torch.Tensor | None,
    first_valid: torch.Tensor | None,
    L0: int,
    L1: int,
    K: int,
    q_start: int,
    scale: float,
    launch=None,
    path: str = "auto",
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] (last dim contiguous); pad uint8 [B', L0]
    with B' ∈ {1, B} (stride 0 broadcast allowed) or None; first_valid int32 [B']. Returns
    (o like q, contiguous; lse fp32 [B,Hq,Lq] in log2 units of scale·q·k).

    path: "auto" (:func:`use_decode_kernel`), "decode" or "general" (the decode kernel is correct for every
    layout, only slow where rows' key ranges differ). num_splits: force the decode kernel's KV splits."""
    if path not in ("auto", "decode", "general"):
        raise ValueError(f"bda_fwd: path must be 'auto', 'decode' or 'general', got {path!r}")
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    if path == "decode" or (path == "auto" and use_decode_kernel(Lq, Lk, L0, L1)):
        return _bda_decode_fwd(q, k, v, pad, first_valid, L0, L1, K, q_start, scale, launch, num_splits)
    launch = launch or (lambda kern: kern)
    k, v = _int32_rows(k), _int32_rows(v)
    Hkv = k.shape[1]
    o = _out(q.shape, dtype=_store_dtype(q.dtype), device=q.device)
    lse = _out(B, Hq, Lq, dtype=torch.float32, device=q.device)
    pad_t, fv_t, stride_pb, has_pad = _pad_args(pad, first_valid, q.device)
    cfg = _config(D, "fwd", fp32=q.dtype == torch.float32)
    tpad, stride_tb = _tile_pad_bits(pad, cfg["BN"], q.device)
    grid = (triton.cdiv(Lq, cfg["BM"]), B * Hq)
    launch(_bda_fwd_kernel)[grid](
        q, k, v, o, lse, pad_t, tpad, fv_t,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], stride_pb, stride_tb,
        Hq, Hq // Hkv, Lq, Lk, L0, L1, K, q_start,
        QK_SCALE=scale * LOG2E, D=D, BD=triton.next_power_of_2(D), BM=cfg["BM"], BN=cfg["BN"],
        HAS_PAD=has_pad, UPCAST=triton_interpret(), PREC=_prec(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o.to(q.dtype), lse


def _bda_decode_fwd(q, k, v, pad, first_valid, L0, L1, K, q_start, scale, launch, num_splits):
    launch = launch or (lambda kern: kern)
    q, k, v = _int32_rows(q), _int32_rows(k), _int32_rows(v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    BD = triton.next_power_of_2(D)
    cfg = _config(D, "decode", fp32=q.dtype == torch.float32, rows=G * Lq)
    BM, BN = cfg["BM"], cfg["BN"]
    n_mt = triton.cdiv(G * Lq, BM)
    n_tiles = triton.cdiv(Lk, BN)
    S = num_splits if num_splits is not None else _decode_splits(B * Hkv * n_mt, n_tiles, q.device)
    S = max(1, min(int(S), n_tiles))
    tps = triton.cdiv(n_tiles, S)
    S = triton.cdiv(n_tiles, tps)
    pad_t, fv_t, stride_pb, has_pad = _pad_args(pad, first_valid, q.device)
    tpad, stride_tb = _tile_pad_bits(pad, BN, q.device)
    lse = _out(B, Hq, Lq, dtype=torch.float32, device=q.device)
    o = _out(q.shape, dtype=_store_dtype(q.dtype), device=q.device)
    if S == 1:  # one split writes O and lse directly
        o_part, l_part, stride_os, stride_ls = o, lse, 0, 0
    else:
        o_part = _out((S, B, Hq, Lq, D), dtype=torch.float32, device=q.device)
        l_part = _out((S, B, Hq, Lq), dtype=torch.float32, device=q.device)
        stride_os, stride_ls = o_part.stride(0), l_part.stride(0)
    so = o_part.stride()[-4:-1]
    launch(_bda_decode_kernel)[(S * n_mt, B * Hkv)](
        q, k, v, o_part, l_part, pad_t, tpad, fv_t,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *so, stride_os, stride_ls, stride_pb, stride_tb,
        Hq, Hkv, G, Lq, Lk, L0, L1, K, q_start, n_mt, tps,
        QK_SCALE=scale * LOG2E, D=D, BD=BD, BM=BM, BN=BN, HAS_PAD=has_pad, UPCAST=triton_interpret(),
        PREC=_prec(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if S > 1:
        cm = _config(D, "merge", interpret=False)
        launch(_bda_decode_merge_kernel)[(triton.cdiv(Lq, cm["BM"]), B * Hq)](
            o_part, l_part, o, lse, stride_os, stride_ls, *o.stride()[:3], Hq, Lq, S,
            D=D, BD=BD, BM=cm["BM"], num_warps=cm["num_warps"], num_stages=cm["num_stages"],
        )
    return o.to(q.dtype), lse


def bda_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    pad: torch.Tensor | None,
    first_valid: torch.Tensor | None,
    L0: int,
    L1: int,
    K: int,
    q_start: int,
    scale: float,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: Δ, then dK/dV (per KV head and key tile) and dQ. Returns dq, dk, dv."""
    launch = launch or (lambda kern: kern)
    q, k, v, do = _int32_rows(q), _int32_rows(k), _int32_rows(v), _int32_rows(do)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    BD = triton.next_power_of_2(D)
    UP, PREC = triton_interpret(), _prec(q.dtype)
    fp32 = q.dtype == torch.float32
    delta = _out(B, Hq, Lq, dtype=torch.float32, device=q.device)
    dq = _out(q.shape, dtype=_store_dtype(q.dtype), device=q.device)
    dk = _out(k.shape, dtype=_store_dtype(k.dtype), device=k.device)
    dv = _out(v.shape, dtype=_store_dtype(v.dtype), device=v.device)
    pad_t, fv_t, stride_pb, has_pad = _pad_args(pad, first_valid, q.device)
    cp = _config(D, "pre")
    launch(_bda_bwd_preprocess_kernel)[(triton.cdiv(Lq, cp["BM"]), B * Hq)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], Hq, Lq,
        D=D, BD=BD, BM=cp["BM"], num_warps=cp["num_warps"], num_stages=cp["num_stages"],
    )
    ck = _config(D, "dkdv", fp32=fp32)
    launch(_bda_bwd_dkdv_kernel)[(triton.cdiv(Lk, ck["BN"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, pad_t, fv_t,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        stride_pb, Hq, Hkv, G, Lq, Lk, L0, L1, K, q_start,
        QK_SCALE=scale * LOG2E, SM_SCALE=scale, D=D, BD=BD, BM=ck["BM"], BN=ck["BN"], HAS_PAD=has_pad,
        UPCAST=UP, PREC=PREC, num_warps=ck["num_warps"], num_stages=ck["num_stages"],
    )
    cq = _config(D, "dq", fp32=fp32)
    tpad, stride_tb = _tile_pad_bits(pad, cq["BN"], q.device)
    launch(_bda_bwd_dq_kernel)[(triton.cdiv(Lq, cq["BM"]), B * Hq)](
        q, k, v, do, lse, delta, dq, pad_t, tpad, fv_t,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], stride_pb, stride_tb,
        Hq, G, Lq, Lk, L0, L1, K, q_start,
        QK_SCALE=scale * LOG2E, SM_SCALE=scale, D=D, BD=BD, BM=cq["BM"], BN=cq["BN"], HAS_PAD=has_pad,
        UPCAST=UP, PREC=PREC, num_warps=cq["num_warps"], num_stages=cq["num_stages"],
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------- AOT specs


def _aot_strides(kernel, D: int) -> dict[str, int]:
    """Launch values of the row/head/batch strides (multiples of D, so of 16: specialised divisible by 16 as at
    launch). The pad bitmap's row stride (L0), the tile-bit stride and the split stride of the partial
    logsumexps (B·Hq·Lq) are arbitrary and stay unspecialised."""
    free = {"stride_pb", "stride_tb", "stride_ls"}
    return {n: 16 * D for n in kernel.arg_names if n.startswith("stride_") and n not in free}


def _aot_specs() -> list[AotSpec]:
    specs = []
    for D in (64, 128):
        scale = 1.0 / math.sqrt(D)
        # bf16 (the training dtype) with and without a pad bitmap; fp16 and fp32 with the pad bitmap, whose
        # kernels are supersets of the pad-free ones (HAS_PAD only adds code), to keep the CI compile short.
        for dt, prec, pads in (("bf16", "tf32", (False, True)), ("fp16", "tf32", (True,)), ("fp32", "ieee", (True,))):
            ty = "*" + dt
            io = {"Q": ty, "Kp": ty, "V": ty, "LSE": "*fp32", "PAD": "*u8", "FV": "*i32"}
            kernels = [
                ("fwd", _bda_fwd_kernel, {**io, "O": ty, "TPAD": "*u8"}, 0),
                ("dkdv", _bda_bwd_dkdv_kernel, {**io, "DO": ty, "DELTA": "*fp32", "DK": ty, "DV": ty}, 0),
                ("dq", _bda_bwd_dq_kernel, {**io, "DO": ty, "DELTA": "*fp32", "DQ": ty, "TPAD": "*u8"}, 0),
            ]
            # decode: the packed-row tiles (G·Lq ≤ 64 and ≤ 128; fp32 has one tile size), output = O (one split)
            # or the fp32 partials (same code, O's pointer type differs)
            for rows in ((64,) if dt == "fp32" else (64, 128)):
                kernels.append(("decode", _bda_decode_kernel, {**io, "O": ty, "TPAD": "*u8"}, rows))
            for has_pad in pads:
                for kind, kernel, ptrs, rows in kernels:
                    c = _config_gpu(D, kind, dt == "fp32", rows)
                    consts = {"D": D, "BD": D, "HAS_PAD": has_pad, "UPCAST": False, "PREC": prec,
                              "QK_SCALE": scale * LOG2E, "BM": c["BM"], "BN": c["BN"]}
                    if kind in ("dkdv", "dq"):
                        consts["SM_SCALE"] = scale
                    label = f"{kind} D={D} {dt} pad={int(has_pad)}" + (f" BM={c['BM']}" if kind == "decode" else "")
                    specs.append(AotSpec(kernel, signature(kernel, ptrs, consts), consts, num_warps=c["num_warps"],
                                         num_stages=c["num_stages"], label=label, ints=_aot_strides(kernel, D)))
        for dt in ("bf16", "fp16", "fp32"):
            c = _config_gpu(D, "pre")
            consts = {"D": D, "BD": D, "BM": c["BM"]}
            ptrs = {"O": "*" + dt, "DO": "*" + dt, "DELTA": "*fp32"}
            specs.append(AotSpec(_bda_bwd_preprocess_kernel, signature(_bda_bwd_preprocess_kernel, ptrs, consts),
                                 consts, num_warps=c["num_warps"], num_stages=c["num_stages"],
                                 label=f"pre D={D} {dt}", ints=_aot_strides(_bda_bwd_preprocess_kernel, D)))
            c = _config_gpu(D, "merge")
            consts = {"D": D, "BD": D, "BM": c["BM"]}
            ptrs = {"OP": "*fp32", "LP": "*fp32", "O": "*" + dt, "LSE": "*fp32"}
            specs.append(AotSpec(_bda_decode_merge_kernel, signature(_bda_decode_merge_kernel, ptrs, consts),
                                 consts, num_warps=c["num_warps"], num_stages=c["num_stages"],
                                 label=f"merge D={D} {dt}", ints=_aot_strides(_bda_decode_merge_kernel, D)))
    return specs


def _config_gpu(D: int, kind: str, fp32: bool = False, rows: int = 64) -> dict[str, int]:
    return _config(D, kind, interpret=False, fp32=fp32, rows=rows)


AOT_SPECS: list[AotSpec] = _aot_specs()
