"""Triton kernels for the SLIM-RL policy loss: one program per row, segmented reductions over the row's
positions in [BNB, BK] tiles (BNB blocks of K positions; one tile row per chunk at sequence/token level).

``_slim_policy_loss_fwd_kernel`` writes per-row statistics (policy term, Σ_M κ, |M|, clipped units, units,
Σ ratio, δ-capped units; the aggregation happens in ``op._combine``); ``_slim_policy_loss_bwd_kernel``
writes ∂L/∂ℓ for every position of the row (0 off the mask) for the aggregation given by POL_AGG / KL_AGG
(per-row divisor in the kernel, batch divisor B or Σ|M| read from ``den_ptr``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slim_ops._aot import AotSpec, signature

LEVEL_ID = {"sequence": 0, "block": 1, "token": 2}
KL_ID = {"k3": 0, "k2": 1, "k1": 2}
AGG_ID = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}
N_STATS = 7
MAX_TILE = 1024


@triton.jit
def _clamp_log_ratio(x):
    return tl.minimum(tl.maximum(x, -10.0), 10.0)


@triton.jit
def _clipped(ratio, a, LO: tl.constexpr, HI: tl.constexpr, HAS_CAP: tl.constexpr, CAP: tl.constexpr):
    """objective, 'gradient kept' flag, TRL clip flag, δ-capped flag."""
    never = ratio < -1.0
    if HAS_CAP:
        obj = tl.minimum(tl.minimum(ratio, CAP) * a, tl.minimum(tl.maximum(ratio, LO), HI) * a)
        keep = tl.where(a >= 0, ratio <= HI, ratio >= LO) & (ratio <= CAP)
        capped = tl.where(a < 0, ratio > CAP, never)
    else:
        obj = tl.minimum(ratio * a, tl.minimum(tl.maximum(ratio, LO), HI) * a)
        keep = tl.where(a >= 0, ratio <= HI, ratio >= LO)
        capped = never
    clipped = tl.where(a > 0, ratio > HI, tl.where(a < 0, ratio < LO, never))
    return obj, keep, clipped, capped


@triton.jit
def _kl_terms(delta, KL: tl.constexpr):
    if KL == 0:
        e = tl.exp(_clamp_log_ratio(-delta))
        kappa = e - 1.0 + delta
        dkappa = 1.0 - tl.where(tl.abs(delta) <= 10.0, e, 0.0)
    elif KL == 1:
        kappa = 0.5 * delta * delta
        dkappa = delta
    else:
        kappa = delta
        dkappa = delta * 0.0 + 1.0
    return kappa, dkappa


@triton.jit
def _load_delta(logp_ptr, old_ptr, ref_ptr, mask_ptr, i_b, c0, L, s_lp, s_old, s_ref, s_m,
                K: tl.constexpr, BNB: tl.constexpr, BK: tl.constexpr, HAS_REF: tl.constexpr):
    o_nb = c0 + tl.arange(0, BNB)
    o_k = tl.arange(0, BK)
    o_pos = o_nb[:, None] * K + o_k[None, :]  # [BNB, BK]
    m_in = (o_k[None, :] < K) & (o_pos < L)
    b_m = tl.load(mask_ptr + i_b * s_m + o_pos, mask=m_in, other=0) != 0
    b_lp = tl.load(logp_ptr + i_b * s_lp + o_pos, mask=b_m, other=0.0).to(tl.float32)
    b_old = tl.load(old_ptr + i_b * s_old + o_pos, mask=b_m, other=0.0).to(tl.float32)
    b_d = tl.where(b_m, b_lp - b_old, 0.0)
    if HAS_REF:
        b_ref = tl.load(ref_ptr + i_b * s_ref + o_pos, mask=b_m, other=0.0).to(tl.float32)
        b_dk = tl.where(b_m, b_lp - b_ref, 0.0)
    else:
        b_dk = b_d
    return b_d, b_dk, b_m, o_pos, m_in


@triton.jit
def _slim_policy_loss_fwd_kernel(logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, rows_ptr, L, s_lp, s_old, s_ref,
                                 s_m, K: tl.constexpr, BNB: tl.constexpr, BK: tl.constexpr, LEVEL: tl.constexpr,
                                 KL: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, HAS_CAP: tl.constexpr,
                                 CAP: tl.constexpr, HAS_REF: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    a = tl.load(adv_ptr + i_b).to(tl.float32)
    acc_n = tl.zeros([BNB], dtype=tl.float32)
    acc_d = tl.zeros([BNB], dtype=tl.float32)
    acc_kl = tl.zeros([BNB], dtype=tl.float32)
    acc_j = tl.zeros([BNB], dtype=tl.float32)
    acc_c = tl.zeros([BNB], dtype=tl.float32)
    acc_u = tl.zeros([BNB], dtype=tl.float32)
    acc_r = tl.zeros([BNB], dtype=tl.float32)
    acc_x = tl.zeros([BNB], dtype=tl.float32)
    for c0 in range(0, tl.cdiv(L, K), BNB):
        b_d, b_dk, b_m, o_pos, m_in = _load_delta(logp_ptr, old_ptr, ref_ptr, mask_ptr, i_b, c0, L, s_lp, s_old,
                                                  s_ref, s_m, K, BNB, BK, HAS_REF)
        kappa, dkappa = _kl_terms(b_dk, KL)
        acc_kl += tl.sum(tl.where(b_m, kappa, 0.0), axis=1)
        b_n = tl.sum(b_m.to(tl.float32), axis=1)  # [BNB]
        acc_n += b_n
        if LEVEL == 0:
            acc_d += tl.sum(b_d, axis=1)
        elif LEVEL == 1:
            ratio = tl.exp(_clamp_log_ratio(tl.sum(b_d, axis=1) / tl.maximum(b_n, 1.0)))
            obj, keep, clipped, capped = _clipped(ratio, a, LO, HI, HAS_CAP, CAP)
            unit = b_n > 0
            acc_j += tl.where(unit, b_n * obj, 0.0)
            acc_c += tl.where(unit & clipped, 1.0, 0.0)
            acc_u += tl.where(unit, 1.0, 0.0)
            acc_r += tl.where(unit, ratio, 0.0)
            acc_x += tl.where(unit & capped, 1.0, 0.0)
        else:
            ratio = tl.exp(_clamp_log_ratio(b_d))  # [BNB, BK]
            obj, keep, clipped, capped = _clipped(ratio, a, LO, HI, HAS_CAP, CAP)
            acc_j += tl.sum(tl.where(b_m, obj, 0.0), axis=1)
            acc_c += tl.sum(tl.where(b_m & clipped, 1.0, 0.0), axis=1)
            acc_u += tl.sum(tl.where(b_m, 1.0, 0.0), axis=1)
            acc_r += tl.sum(tl.where(b_m, ratio, 0.0), axis=1)
            acc_x += tl.sum(tl.where(b_m & capped, 1.0, 0.0), axis=1)
    n = tl.sum(acc_n, axis=0)
    if LEVEL == 0:
        ratio = tl.exp(_clamp_log_ratio(tl.sum(acc_d, axis=0) / tl.maximum(n, 1.0)))
        obj, keep, clipped, capped = _clipped(ratio, a, LO, HI, HAS_CAP, CAP)
        unit = n > 0
        j = tl.where(unit, obj, 0.0)
        c = tl.where(unit & clipped, 1.0, 0.0)
        u = tl.where(unit, 1.0, 0.0)
        r = tl.where(unit, ratio, 0.0)
        x = tl.where(unit & capped, 1.0, 0.0)
    else:
        j = tl.sum(acc_j, axis=0)
        c = tl.sum(acc_c, axis=0)
        u = tl.sum(acc_u, axis=0)
        r = tl.sum(acc_r, axis=0)
        x = tl.sum(acc_x, axis=0)
    p_out = rows_ptr + i_b * 7
    tl.store(p_out + 0, j)
    tl.store(p_out + 1, tl.sum(acc_kl, axis=0))
    tl.store(p_out + 2, n)
    tl.store(p_out + 3, c)
    tl.store(p_out + 4, u)
    tl.store(p_out + 5, r)
    tl.store(p_out + 6, x)


@triton.jit
def _agg_divisor(n, l1, AGG: tl.constexpr):
    if AGG == 1:
        d = tl.maximum(n, 1.0)
    elif AGG == 3:
        d = l1
    else:
        d = n * 0.0 + 1.0
    return d


@triton.jit
def _slim_policy_loss_bwd_kernel(gl_ptr, logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, w_ptr, den_ptr, grad_ptr,
                                 L, L1, s_lp, s_old, s_ref, s_m, s_g,
                                 K: tl.constexpr, BNB: tl.constexpr, BK: tl.constexpr, LEVEL: tl.constexpr,
                                 KL: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, KL_COEF: tl.constexpr,
                                 HAS_CAP: tl.constexpr, CAP: tl.constexpr, HAS_REF: tl.constexpr,
                                 POL_AGG: tl.constexpr, KL_AGG: tl.constexpr, SAME_DEN: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    a = tl.load(adv_ptr + i_b).to(tl.float32)
    l1 = L1.to(tl.float32)
    gw = tl.load(gl_ptr).to(tl.float32) * tl.load(w_ptr + i_b).to(tl.float32)
    scale = gw / tl.load(den_ptr)
    scale_k = gw / tl.load(den_ptr + 1)
    gs = 0.0
    n = 0.0
    if LEVEL == 0 or POL_AGG == 1 or KL_AGG == 1:
        acc_n = tl.zeros([BNB], dtype=tl.float32)
        acc_d = tl.zeros([BNB], dtype=tl.float32)
        for c0 in range(0, tl.cdiv(L, K), BNB):
            b_d, b_dk, b_m, o_pos, m_in = _load_delta(logp_ptr, old_ptr, ref_ptr, mask_ptr, i_b, c0, L, s_lp,
                                                      s_old, s_ref, s_m, K, BNB, BK, False)
            acc_n += tl.sum(b_m.to(tl.float32), axis=1)
            acc_d += tl.sum(b_d, axis=1)
        n = tl.sum(acc_n, axis=0)
        if LEVEL == 0:
            raw = tl.sum(acc_d, axis=0) / tl.maximum(n, 1.0)
            ratio = tl.exp(_clamp_log_ratio(raw))
            obj, keep, clipped, capped = _clipped(ratio, a, LO, HI, HAS_CAP, CAP)
            if POL_AGG == 1:
                gs = tl.where(keep & (tl.abs(raw) <= 10.0), a * ratio, 0.0) / tl.maximum(n, 1.0)
            else:
                gs = tl.where(keep & (tl.abs(raw) <= 10.0), a * ratio, 0.0) / _agg_divisor(n, l1, POL_AGG)
    dp = _agg_divisor(n, l1, POL_AGG)
    dk = _agg_divisor(n, l1, KL_AGG)
    for c0 in range(0, tl.cdiv(L, K), BNB):
        b_d, b_dk, b_m, o_pos, m_in = _load_delta(logp_ptr, old_ptr, ref_ptr, mask_ptr, i_b, c0, L, s_lp, s_old,
                                                  s_ref, s_m, K, BNB, BK, HAS_REF)
        kappa, dkappa = _kl_terms(b_dk, KL)
        if LEVEL == 0:
            dj = tl.zeros([BNB, BK], dtype=tl.float32) + gs
        elif LEVEL == 1:
            b_n = tl.sum(b_m.to(tl.float32), axis=1)
            raw = tl.sum(b_d, axis=1) / tl.maximum(b_n, 1.0)
            ratio = tl.exp(_clamp_log_ratio(raw))
            obj, keep, clipped, capped = _clipped(ratio, a, LO, HI, HAS_CAP, CAP)
            g_blk = tl.where(keep & (tl.abs(raw) <= 10.0), a * ratio, 0.0) / dp  # [BNB]
            dj = tl.zeros([BNB, BK], dtype=tl.float32) + g_blk[:, None]
        else:
            ratio = tl.exp(_clamp_log_ratio(b_d))
            obj, keep, clipped, capped = _clipped(ratio, a, LO, HI, HAS_CAP, CAP)
            dj = tl.where(keep & (tl.abs(b_d) <= 10.0), a * ratio, 0.0) / dp
        if SAME_DEN:
            b_g = tl.where(b_m, scale * (KL_COEF * (dkappa / dk) - dj), 0.0)
        else:
            b_g = tl.where(b_m, scale_k * (KL_COEF * (dkappa / dk)) - scale * dj, 0.0)
        tl.store(grad_ptr + i_b * s_g + o_pos, b_g.to(grad_ptr.dtype.element_ty), mask=m_in)


def _tiles(level: str, L: int, block_size: int) -> tuple[int, int, int]:
    """(K, BNB, BK) for a row of L positions."""
    if level == "block":
        K = int(block_size)
        BK = triton.next_power_of_2(K)
        nb = triton.cdiv(L, K)
        BNB = max(1, min(triton.next_power_of_2(nb), max(1, MAX_TILE // BK)))
        return K, BNB, BK
    BK = min(triton.next_power_of_2(L), MAX_TILE)
    return BK, 1, BK


def _prep(logp, logp_old, loss_mask):
    return logp.contiguous(), logp_old.contiguous(), loss_mask.contiguous().view(torch.uint8)


def _cap(cap: float) -> tuple[bool, float]:
    has = math.isfinite(cap)
    return has, float(cap) if has else 0.0


def policy_loss_rows_triton(logp, logp_old, kl_reference, loss_mask, advantages, *, level, lo, hi, cap,
                            kl_estimator, block_size):
    """Per-row statistics [B, 7] (see ``slim_ops.ops.policy_loss.op.ROW_STATS``); ``kl_reference`` None:
    the KL uses logp_old."""
    B, L = logp.shape
    logp, logp_old, m = _prep(logp, logp_old, loss_mask)
    ref = kl_reference.contiguous() if kl_reference is not None else logp_old
    rows = torch.full((B, N_STATS), float("nan"), dtype=torch.float32, device=logp.device)
    K, BNB, BK = _tiles(level, L, block_size)
    has_cap, cap_v = _cap(cap)
    _slim_policy_loss_fwd_kernel[(B,)](logp, logp_old, ref, m, advantages.contiguous(), rows, L,
                                       logp.stride(0), logp_old.stride(0), ref.stride(0), m.stride(0),
                                       K=K, BNB=BNB, BK=BK, LEVEL=LEVEL_ID[level], KL=KL_ID[kl_estimator],
                                       LO=float(lo), HI=float(hi), HAS_CAP=has_cap, CAP=cap_v,
                                       HAS_REF=kl_reference is not None, num_warps=4)
    return rows


def policy_loss_grad_triton(grad_loss, logp, logp_old, kl_reference, loss_mask, advantages, weights, *, level,
                            lo, hi, cap, kl_coef, kl_estimator, L1, block_size, pol_agg, kl_agg):
    """∂L/∂logp [B, L] in logp's dtype (every position written)."""
    B, L = logp.shape
    logp, logp_old, m = _prep(logp, logp_old, loss_mask)
    ref = kl_reference.contiguous() if kl_reference is not None else logp_old
    grad = torch.full_like(logp, float("nan"))  # every position is written
    K, BNB, BK = _tiles(level, L, block_size)
    has_cap, cap_v = _cap(cap)
    if "token-mean" in (pol_agg, kl_agg):
        tokens = m.sum(dtype=torch.float32).clamp_min(1.0).reshape(1)
        rows_b = torch.full((1,), float(B), dtype=torch.float32, device=logp.device)
        den = torch.cat([tokens if pol_agg == "token-mean" else rows_b, tokens if kl_agg == "token-mean" else rows_b])
    else:
        den = torch.full((2,), float(B), dtype=torch.float32, device=logp.device)
    same = (pol_agg == "token-mean") == (kl_agg == "token-mean")
    _slim_policy_loss_bwd_kernel[(B,)](grad_loss.contiguous(), logp, logp_old, ref, m, advantages.contiguous(),
                                       weights.contiguous(), den, grad, L, int(L1), logp.stride(0),
                                       logp_old.stride(0), ref.stride(0), m.stride(0), grad.stride(0),
                                       K=K, BNB=BNB, BK=BK, LEVEL=LEVEL_ID[level], KL=KL_ID[kl_estimator],
                                       LO=float(lo), HI=float(hi), KL_COEF=float(kl_coef), HAS_CAP=has_cap,
                                       CAP=cap_v, HAS_REF=kl_reference is not None, POL_AGG=AGG_ID[pol_agg],
                                       KL_AGG=AGG_ID[kl_agg], SAME_DEN=same, num_warps=4)
    return grad


def _aot_specs() -> list[AotSpec]:
    specs = []
    # (level, kl, tiles, options): the defaults (no clip_delta, loss_agg=None), then clip_delta + kl_reference with
    # each aggregation
    for level, kl, (K, BNB, BK), opt in (("sequence", "k3", (256, 1, 256), None),
                                         ("sequence", "k2", (256, 1, 256), None),
                                         ("sequence", "k1", (1024, 1, 1024), None),
                                         ("block", "k3", (16, 16, 16), None),
                                         ("token", "k3", (256, 1, 256), None),
                                         ("sequence", "k3", (256, 1, 256), "token-mean"),
                                         ("block", "k3", (16, 16, 16), "seq-mean-token-mean"),
                                         ("token", "k3", (256, 1, 256), "seq-mean-token-sum")):
        const = {"K": K, "BNB": BNB, "BK": BK, "LEVEL": LEVEL_ID[level], "KL": KL_ID[kl],
                 "LO": 0.9, "HI": 1.1, "HAS_CAP": opt is not None, "CAP": 3.0 if opt else 0.0,
                 "HAS_REF": opt is not None}
        label = f"{level} {kl} K={K} BNB={BNB}" + (f" delta ref {opt}" if opt else "")
        ptrs = {"logp_ptr": "*fp32", "old_ptr": "*fp32", "ref_ptr": "*fp32", "mask_ptr": "*u8", "adv_ptr": "*fp32",
                "rows_ptr": "*fp32", "gl_ptr": "*fp32", "w_ptr": "*fp32", "den_ptr": "*fp32", "grad_ptr": "*fp32"}
        strides = ("L", "s_lp", "s_old", "s_ref", "s_m")
        fwd_ptrs = {k: v for k, v in ptrs.items() if k in _slim_policy_loss_fwd_kernel.arg_names}
        specs.append(AotSpec(_slim_policy_loss_fwd_kernel, signature(_slim_policy_loss_fwd_kernel, fwd_ptrs, const),
                             const, num_warps=4, label=label, ints=dict.fromkeys(strides, 2048)))
        pol_agg = opt or ("seq-mean-token-mean" if level == "sequence" else "seq-mean-token-sum-norm")
        kl_agg = opt or "seq-mean-token-sum-norm"
        const_b = dict(const, KL_COEF=0.01, POL_AGG=AGG_ID[pol_agg], KL_AGG=AGG_ID[kl_agg],
                       SAME_DEN=(pol_agg == "token-mean") == (kl_agg == "token-mean"))
        bwd_ptrs = {k: v for k, v in ptrs.items() if k in _slim_policy_loss_bwd_kernel.arg_names}
        specs.append(AotSpec(_slim_policy_loss_bwd_kernel, signature(_slim_policy_loss_bwd_kernel, bwd_ptrs, const_b),
                             const_b, num_warps=4, label=label, ints=dict.fromkeys(strides + ("s_g",), 2048)))
    return specs


AOT_SPECS = _aot_specs()
