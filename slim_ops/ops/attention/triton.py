"""Triton flash-attention forward and backward for block-diffusion layouts (SPEC §3).

The mask is never stored. Each query row derives its allowed keys from (L0, L1, K, Lc = L0 + L1,
the stream position, the first non-pad prompt index) as two key intervals (see
``BlockLayout.row_intervals``): ``[a_lo, a_hi)`` on the prompt/clean side (prompt pads hidden unless
the row is self-only) and ``[b_lo, b_hi)`` = its own noisy block. Per (query tile, key tile) the
kernel classifies the pair from these intervals: *skip* (no row touches the tile), *full* (every row
sees every column and no column is a pad: no masking) or *partial* (elementwise mask). Query tiles
visit only the key tiles spanned by their two intervals; the dK/dV kernel visits only the query
tiles that can see its key tile.

Kernels: ``_bda_fwd_kernel`` (O and the log2-domain logsumexp), ``_bda_bwd_preprocess_kernel``
(Δ = rowsum(dO ∘ O)), ``_bda_bwd_dkdv_kernel`` (one key tile of one KV head, looping over its query
heads: no atomics), ``_bda_bwd_dq_kernel``. All offsets are int64.
"""

from __future__ import annotations

import math

import torch
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
def _bda_tile_class(n0, m_q, a_lo, a_hi, b_lo, b_hi, p_pad, L0, BN: tl.constexpr, HAS_PAD: tl.constexpr):
    """(any, full, pad bits [BN]) of key tile [n0, n0+BN) against the rows' intervals."""
    n1 = n0 + BN
    hit = ((n0 < a_hi) & (n1 > a_lo)) | ((n0 < b_hi) & (n1 > b_lo))
    row_full = ((n0 >= a_lo) & (n1 <= a_hi)) | ((n0 >= b_lo) & (n1 <= b_hi)) | (m_q == 0)
    tile_any = tl.max(hit.to(tl.int32), axis=0) > 0
    tile_full = tl.min(row_full.to(tl.int32), axis=0) > 0
    o_n = n0 + tl.arange(0, BN)
    if HAS_PAD:
        b_pad = tl.load(p_pad + o_n, mask=o_n < L0, other=0).to(tl.int32)
        tile_full = tile_full & (tl.max(b_pad, axis=0) == 0)
    else:
        b_pad = tl.zeros([BN], dtype=tl.int32)
    return tile_any, tile_full, b_pad


@triton.jit
def _bda_tile_full(n0, m_q, a_lo, a_hi, b_lo, b_hi, p_pad, L0, BN: tl.constexpr, HAS_PAD: tl.constexpr):
    """(full, pad bits [BN]) of key tile [n0, n0+BN): every valid row sees every column, no column is a pad."""
    n1 = n0 + BN
    row_full = ((n0 >= a_lo) & (n1 <= a_hi)) | ((n0 >= b_lo) & (n1 <= b_hi)) | (m_q == 0)
    tile_full = tl.min(row_full.to(tl.int32), axis=0) > 0
    if HAS_PAD:
        o_n = n0 + tl.arange(0, BN)
        b_pad = tl.load(p_pad + o_n, mask=o_n < L0, other=0).to(tl.int32)
        tile_full = tile_full & (tl.max(b_pad, axis=0) == 0)
    else:
        b_pad = tl.zeros([BN], dtype=tl.int32)
    return tile_full, b_pad


@triton.jit
def _bda_tile_mask(n0, a_lo, a_hi, b_lo, b_hi, self_only, b_pad, BN: tl.constexpr, HAS_PAD: tl.constexpr):
    """bool [BM, BN]: the elementwise predicate on one tile."""
    o_n = n0 + tl.arange(0, BN)
    m_a = (o_n[None, :] >= a_lo[:, None]) & (o_n[None, :] < a_hi[:, None])
    if HAS_PAD:
        m_a = m_a & ((b_pad[None, :] == 0) | self_only[:, None])
    m_b = (o_n[None, :] >= b_lo[:, None]) & (o_n[None, :] < b_hi[:, None])
    return m_a | m_b


@triton.jit
def _bda_fwd_tile(b_acc, b_m, b_l, b_q, p_kb, p_vb, n0, Lk, stride_kn, stride_vn, m_q,
                  a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE: tl.constexpr, D: tl.constexpr,
                  BD: tl.constexpr, BN: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
                  PREC: tl.constexpr):
    # unconditional loads (the loop ranges only visit tiles some row needs) so the loop software-pipelines
    tile_full, b_pad = _bda_tile_full(n0, m_q, a_lo, a_hi, b_lo, b_hi, p_pad, L0, BN, HAS_PAD)
    o_n = n0 + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_kv = (o_n < Lk)[:, None] & (o_d < D)[None, :]
    b_k = tl.load(p_kb + o_n[:, None] * stride_kn + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    b_v = tl.load(p_vb + o_n[:, None] * stride_vn + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * QK_SCALE  # [BM, BN]
    if not tile_full:
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
def _bda_fwd_kernel(Q, Kp, V, O, LSE, PAD, FV,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_pb,
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
    p_kb = Kp + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_vb = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_pad = PAD + i_b.to(tl.int64) * stride_pb
    if HAS_PAD:
        fv = tl.load(FV + i_b)
    else:
        fv = 0
    a_lo, a_hi, b_lo, b_hi, self_only = _bda_row_intervals(o_q, m_q, L0, L1, K, Lc, fv, HAS_PAD)
    lo_a = tl.min(tl.where(m_q, a_lo, _BIG), axis=0)
    hi_a = tl.max(a_hi, axis=0)
    lo_b = tl.min(tl.where(b_hi > b_lo, b_lo, _BIG), axis=0)
    hi_b = tl.max(b_hi, axis=0)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    for n0 in range((tl.minimum(lo_a, hi_a) // BN) * BN, hi_a, BN):
        b_acc, b_m, b_l = _bda_fwd_tile(b_acc, b_m, b_l, b_q, p_kb, p_vb, n0, Lk, stride_kn, stride_vn, m_q,
                                        a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE, D, BD, BN,
                                        HAS_PAD, UPCAST, PREC)
    start_b = tl.maximum((tl.minimum(lo_b, hi_b) // BN) * BN, ((hi_a + BN - 1) // BN) * BN)
    for n0 in range(start_b, hi_b, BN):
        b_acc, b_m, b_l = _bda_fwd_tile(b_acc, b_m, b_l, b_q, p_kb, p_vb, n0, Lk, stride_kn, stride_vn, m_q,
                                        a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE, D, BD, BN,
                                        HAS_PAD, UPCAST, PREC)
    b_ls = tl.where(m_q, b_l, 1.0)
    b_o = b_acc / b_ls[:, None]
    p_o = tl.make_block_ptr(O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh, (Lq, D),
                            (stride_om, 1), (i_m * BM, 0), (BM, BD), (1, 0))
    tl.store(p_o, b_o.to(O.dtype.element_ty), boundary_check=(0, 1))
    tl.store(LSE + i_bh.to(tl.int64) * Lq + o_m, b_m + tl.log2(b_ls), mask=m_q)


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
def _bda_bwd_dkdv_kernel(Q, Kp, V, DO, LSE, DELTA, DK, DV, PAD, FV,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                         stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_pb,
                         Hq, Hkv, G, Lq, Lk, L0, L1, K, q_start,
                         QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
                         PREC: tl.constexpr):
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
    if HAS_PAD:
        fv = tl.load(FV + i_b)
    else:
        fv = 0
    # absolute query range [qs, qe) that can see this key tile
    nl = tl.minimum(n0 + BN, Lk) - 1
    qs_p = L0 - (tl.maximum(L0 - 1 - n0, 0) // K + 1) * K
    qs_c = L0 + (tl.maximum(n0 - L0, 0) // K) * K
    t0 = tl.maximum(n0 - Lc, 0)
    s0 = t0 // L1
    qs_x = Lc + s0 * L1 + ((t0 - s0 * L1) // K) * K
    t1 = tl.maximum(nl - Lc, 0)
    s1 = t1 // L1
    qe_x = Lc + s1 * L1 + tl.minimum(((t1 - s1 * L1) // K + 1) * K, L1)
    qs = tl.where(n0 < L0, tl.maximum(qs_p, 0), tl.where(n0 < Lc, qs_c, qs_x))
    qe = tl.where(n0 < Lc, Lq + q_start, qe_x)
    ms = tl.maximum(qs - q_start, 0)
    me = tl.minimum(qe - q_start, Lq)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    for m0 in range((ms // BM) * BM, me, BM):
        o_m = m0 + tl.arange(0, BM)
        m_q = o_m < Lq
        a_lo, a_hi, b_lo, b_hi, self_only = _bda_row_intervals(o_m + q_start, m_q, L0, L1, K, Lc, fv, HAS_PAD)
        tile_any, tile_full, b_pad = _bda_tile_class(n0, m_q, a_lo, a_hi, b_lo, b_hi, p_pad, L0, BN, HAS_PAD)
        if tile_any:
            b_mask_t = tl.trans(_bda_tile_mask(n0, a_lo, a_hi, b_lo, b_hi, self_only, b_pad, BN, HAS_PAD))
            for i_g in range(0, G):
                i_h = i_hk * G + i_g
                i_bhq = i_b * Hq + i_h
                p_q = tl.make_block_ptr(Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh,
                                        (Lq, D), (stride_qm, 1), (m0, 0), (BM, BD), (1, 0))
                p_do = tl.make_block_ptr(DO + i_b.to(tl.int64) * stride_db + i_h.to(tl.int64) * stride_dh,
                                         (Lq, D), (stride_dm, 1), (m0, 0), (BM, BD), (1, 0))
                b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")  # [BM, BD]
                b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")  # [BM, BD]
                if UPCAST:
                    b_q = b_q.to(tl.float32)
                    b_do = b_do.to(tl.float32)
                b_lse = tl.load(LSE + i_bhq.to(tl.int64) * Lq + o_m, mask=m_q, other=0.0)
                b_delta = tl.load(DELTA + i_bhq.to(tl.int64) * Lq + o_m, mask=m_q, other=0.0)
                b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * QK_SCALE
                               - b_lse[None, :])  # [BN, BM]
                if not tile_full:
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
def _bda_bwd_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, p_kb, p_vb, n0, Lk, stride_kn, stride_vn, m_q,
                     a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE: tl.constexpr, D: tl.constexpr,
                     BD: tl.constexpr, BN: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
                     PREC: tl.constexpr):
    tile_full, b_pad = _bda_tile_full(n0, m_q, a_lo, a_hi, b_lo, b_hi, p_pad, L0, BN, HAS_PAD)
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
    if not tile_full:
        b_mask = _bda_tile_mask(n0, a_lo, a_hi, b_lo, b_hi, self_only, b_pad, BN, HAS_PAD)
        b_p = tl.where(b_mask, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    return b_dq


@triton.jit
def _bda_bwd_dq_kernel(Q, Kp, V, DO, LSE, DELTA, DQ, PAD, FV,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                       stride_dqb, stride_dqh, stride_dqm, stride_pb,
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
    p_kb = Kp + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_vb = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_pad = PAD + i_b.to(tl.int64) * stride_pb
    if HAS_PAD:
        fv = tl.load(FV + i_b)
    else:
        fv = 0
    a_lo, a_hi, b_lo, b_hi, self_only = _bda_row_intervals(o_m + q_start, m_q, L0, L1, K, Lc, fv, HAS_PAD)
    lo_a = tl.min(tl.where(m_q, a_lo, _BIG), axis=0)
    hi_a = tl.max(a_hi, axis=0)
    lo_b = tl.min(tl.where(b_hi > b_lo, b_lo, _BIG), axis=0)
    hi_b = tl.max(b_hi, axis=0)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range((tl.minimum(lo_a, hi_a) // BN) * BN, hi_a, BN):
        b_dq = _bda_bwd_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, p_kb, p_vb, n0, Lk, stride_kn, stride_vn,
                                m_q, a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE, D, BD, BN,
                                HAS_PAD, UPCAST, PREC)
    start_b = tl.maximum((tl.minimum(lo_b, hi_b) // BN) * BN, ((hi_a + BN - 1) // BN) * BN)
    for n0 in range(start_b, hi_b, BN):
        b_dq = _bda_bwd_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, p_kb, p_vb, n0, Lk, stride_kn, stride_vn,
                                m_q, a_lo, a_hi, b_lo, b_hi, self_only, p_pad, L0, QK_SCALE, D, BD, BN,
                                HAS_PAD, UPCAST, PREC)
    p_dq = tl.make_block_ptr(DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh, (Lq, D),
                             (stride_dqm, 1), (i_m * BM, 0), (BM, BD), (1, 0))
    tl.store(p_dq, (b_dq * SM_SCALE).to(DQ.dtype.element_ty), boundary_check=(0, 1))


# ------------------------------------------------------------------------------------------- launchers

SUPPORTED_D = (64, 128)  # compiled (AOT_SPECS) head dims on GPUs
SUPPORTED_D_INTERPRET = (16, 32, 64, 128)  # the interpreter also runs the small test head dims


def supported_head_dims() -> tuple[int, ...]:
    return SUPPORTED_D_INTERPRET if triton_interpret() else SUPPORTED_D


# (kind, D) -> tiles chosen so that no configuration spills at sm_90a (see AOT_SPECS / tests/test_compile.py)
_GPU_CONFIGS: dict[tuple[str, int], dict[str, int]] = {
    ("fwd", 128): {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
    ("dkdv", 128): {"BM": 16, "BN": 64, "num_warps": 8, "num_stages": 2},
    ("dq", 128): {"BM": 64, "BN": 32, "num_warps": 8, "num_stages": 2},
    ("fwd", 64): {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
    ("dkdv", 64): {"BM": 32, "BN": 64, "num_warps": 8, "num_stages": 2},
    ("dq", 64): {"BM": 64, "BN": 32, "num_warps": 4, "num_stages": 2},
}
# fp32 inputs use exact (ieee) dots without tensor cores: the exactness path, with small tiles
_FP32_CONFIGS: dict[str, dict[str, int]] = {
    "fwd": {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 2},
    "dkdv": {"BM": 16, "BN": 32, "num_warps": 8, "num_stages": 2},
    "dq": {"BM": 32, "BN": 16, "num_warps": 8, "num_stages": 2},
}


def _config(D: int, kind: str, interpret: bool | None = None, fp32: bool = False) -> dict[str, int]:
    """Tile sizes / warps per kernel; the interpreter uses 16×16 tiles to exercise many tiles cheaply."""
    if triton_interpret() if interpret is None else interpret:
        return {"BM": 16, "BN": 16, "num_warps": 4, "num_stages": 1}
    if kind == "pre":
        return {"BM": 64, "num_warps": 4, "num_stages": 1}
    if fp32:
        return dict(_FP32_CONFIGS[kind])
    return dict(_GPU_CONFIGS[(kind, 128 if D > 64 else 64)])


def _int32_rows(t: torch.Tensor) -> torch.Tensor:
    """K/V rows are addressed as int64 (batch, head) base + int32 row offset (keeps the pipelined loop's
    address tiles 32-bit); a view whose per-head row span does not fit int32 is made contiguous."""
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] (last dim contiguous); pad uint8 [B', L0]
    with B' ∈ {1, B} (stride 0 broadcast allowed) or None; first_valid int32 [B']. Returns
    (o like q, contiguous; lse fp32 [B,Hq,Lq] in log2 units of scale·q·k)."""
    launch = launch or (lambda kern: kern)
    k, v = _int32_rows(k), _int32_rows(v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    o = torch.empty(q.shape, dtype=_store_dtype(q.dtype), device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    pad_t, fv_t, stride_pb, has_pad = _pad_args(pad, first_valid, q.device)
    cfg = _config(D, "fwd", fp32=q.dtype == torch.float32)
    grid = (triton.cdiv(Lq, cfg["BM"]), B * Hq)
    launch(_bda_fwd_kernel)[grid](
        q,
        k,
        v,
        o,
        lse,
        pad_t,
        fv_t,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *o.stride()[:3],
        stride_pb,
        Hq,
        Hq // Hkv,
        Lq,
        Lk,
        L0,
        L1,
        K,
        q_start,
        QK_SCALE=scale * LOG2E,
        D=D,
        BD=triton.next_power_of_2(D),
        BM=cfg["BM"],
        BN=cfg["BN"],
        HAS_PAD=has_pad,
        UPCAST=triton_interpret(),
        PREC=_prec(q.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
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
    k, v = _int32_rows(k), _int32_rows(v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    BD = triton.next_power_of_2(D)
    UP, PREC = triton_interpret(), _prec(q.dtype)
    delta = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=_store_dtype(q.dtype), device=q.device)
    dk = torch.empty(k.shape, dtype=_store_dtype(k.dtype), device=k.device)
    dv = torch.empty(v.shape, dtype=_store_dtype(v.dtype), device=v.device)
    pad_t, fv_t, stride_pb, has_pad = _pad_args(pad, first_valid, q.device)
    cp = _config(D, "pre")
    launch(_bda_bwd_preprocess_kernel)[(triton.cdiv(Lq, cp["BM"]), B * Hq)](
        o,
        do,
        delta,
        *o.stride()[:3],
        *do.stride()[:3],
        Hq,
        Lq,
        D=D,
        BD=BD,
        BM=cp["BM"],
        num_warps=cp["num_warps"],
        num_stages=cp["num_stages"],
    )
    ck = _config(D, "dkdv", fp32=q.dtype == torch.float32)
    launch(_bda_bwd_dkdv_kernel)[(triton.cdiv(Lk, ck["BN"]), B * Hkv)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        pad_t,
        fv_t,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *do.stride()[:3],
        *dk.stride()[:3],
        *dv.stride()[:3],
        stride_pb,
        Hq,
        Hkv,
        G,
        Lq,
        Lk,
        L0,
        L1,
        K,
        q_start,
        QK_SCALE=scale * LOG2E,
        SM_SCALE=scale,
        D=D,
        BD=BD,
        BM=ck["BM"],
        BN=ck["BN"],
        HAS_PAD=has_pad,
        UPCAST=UP,
        PREC=PREC,
        num_warps=ck["num_warps"],
        num_stages=ck["num_stages"],
    )
    cq = _config(D, "dq", fp32=q.dtype == torch.float32)
    launch(_bda_bwd_dq_kernel)[(triton.cdiv(Lq, cq["BM"]), B * Hq)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        pad_t,
        fv_t,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *do.stride()[:3],
        *dq.stride()[:3],
        stride_pb,
        Hq,
        G,
        Lq,
        Lk,
        L0,
        L1,
        K,
        q_start,
        QK_SCALE=scale * LOG2E,
        SM_SCALE=scale,
        D=D,
        BD=BD,
        BM=cq["BM"],
        BN=cq["BN"],
        HAS_PAD=has_pad,
        UPCAST=UP,
        PREC=PREC,
        num_warps=cq["num_warps"],
        num_stages=cq["num_stages"],
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------- AOT specs


def _aot_specs() -> list[AotSpec]:
    specs = []
    for D in (64, 128):
        scale = 1.0 / math.sqrt(D)
        # bf16 (the training dtype) with and without a pad bitmap; fp16 and fp32 with the pad bitmap, whose
        # kernels are supersets of the pad-free ones (HAS_PAD only adds code), to keep the CI compile short.
        for dt, prec, pads in (("bf16", "tf32", (False, True)), ("fp16", "tf32", (True,)), ("fp32", "ieee", (True,))):
            ty = "*" + dt
            io = {"Q": ty, "Kp": ty, "V": ty, "LSE": "*fp32", "PAD": "*u8", "FV": "*i32"}
            kernels = (
                ("fwd", _bda_fwd_kernel, {**io, "O": ty}),
                ("dkdv", _bda_bwd_dkdv_kernel, {**io, "DO": ty, "DELTA": "*fp32", "DK": ty, "DV": ty}),
                ("dq", _bda_bwd_dq_kernel, {**io, "DO": ty, "DELTA": "*fp32", "DQ": ty}),
            )
            for has_pad in pads:
                for kind, kernel, ptrs in kernels:
                    c = _config_gpu(D, kind, dt == "fp32")
                    consts = {"D": D, "BD": D, "HAS_PAD": has_pad, "UPCAST": False, "PREC": prec,
                              "QK_SCALE": scale * LOG2E, "BM": c["BM"], "BN": c["BN"]}
                    if kind != "fwd":
                        consts["SM_SCALE"] = scale
                    specs.append(AotSpec(kernel, signature(kernel, ptrs, consts), consts, num_warps=c["num_warps"],
                                         num_stages=c["num_stages"], label=f"{kind} D={D} {dt} pad={int(has_pad)}"))
        for dt in ("bf16", "fp16", "fp32"):
            c = _config_gpu(D, "pre")
            consts = {"D": D, "BD": D, "BM": c["BM"]}
            ptrs = {"O": "*" + dt, "DO": "*" + dt, "DELTA": "*fp32"}
            specs.append(AotSpec(_bda_bwd_preprocess_kernel, signature(_bda_bwd_preprocess_kernel, ptrs, consts),
                                 consts, num_warps=c["num_warps"], num_stages=c["num_stages"],
                                 label=f"pre D={D} {dt}"))
    return specs


def _config_gpu(D: int, kind: str, fp32: bool = False) -> dict[str, int]:
    return _config(D, kind, interpret=False, fp32=fp32)


AOT_SPECS: list[AotSpec] = _aot_specs()
