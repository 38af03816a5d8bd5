"""Triton kernels for the SLIM-RL policy loss: one program per row, segmented reductions over the row's
positions in [BNB, BK] tiles (BNB blocks of K positions; one tile row per chunk at sequence/token level).

``_slim_policy_loss_fwd_kernel`` writes per-row statistics (J, KL_row, |M|, clipped units, units, Σ ratio);
``_slim_policy_loss_bwd_kernel`` writes ∂L/∂ℓ for every position of the row (0 off the mask).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slim_ops._aot import AotSpec

LEVEL_ID = {"sequence": 0, "block": 1, "token": 2}
KL_ID = {"k3": 0, "k2": 1, "k1": 2}
N_STATS = 6
MAX_TILE = 1024


@triton.jit
def _clamp_log_ratio(x):
    return tl.minimum(tl.maximum(x, -10.0), 10.0)


@triton.jit
def _clipped(ratio, a, LO: tl.constexpr, HI: tl.constexpr):
    obj = tl.minimum(ratio * a, tl.minimum(tl.maximum(ratio, LO), HI) * a)
    keep = tl.where(a >= 0, ratio <= HI, ratio >= LO)
    return obj, keep


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
def _load_delta(logp_ptr, old_ptr, mask_ptr, i_b, c0, L, s_lp, s_old, s_m,
                K: tl.constexpr, BNB: tl.constexpr, BK: tl.constexpr):
    o_nb = c0 + tl.arange(0, BNB)
    o_k = tl.arange(0, BK)
    o_pos = o_nb[:, None] * K + o_k[None, :]  # [BNB, BK]
    m_in = (o_k[None, :] < K) & (o_pos < L)
    b_m = tl.load(mask_ptr + i_b * s_m + o_pos, mask=m_in, other=0) != 0
    b_lp = tl.load(logp_ptr + i_b * s_lp + o_pos, mask=b_m, other=0.0).to(tl.float32)
    b_old = tl.load(old_ptr + i_b * s_old + o_pos, mask=b_m, other=0.0).to(tl.float32)
    b_d = tl.where(b_m, b_lp - b_old, 0.0)
    return b_d, b_m, o_pos, m_in


@triton.jit
def _slim_policy_loss_fwd_kernel(logp_ptr, old_ptr, mask_ptr, adv_ptr, rows_ptr, L, L1, s_lp, s_old, s_m,
                                 K: tl.constexpr, BNB: tl.constexpr, BK: tl.constexpr, LEVEL: tl.constexpr,
                                 KL: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    a = tl.load(adv_ptr + i_b).to(tl.float32)
    l1 = L1.to(tl.float32)
    acc_n = tl.zeros([BNB], dtype=tl.float32)
    acc_d = tl.zeros([BNB], dtype=tl.float32)
    acc_kl = tl.zeros([BNB], dtype=tl.float32)
    acc_j = tl.zeros([BNB], dtype=tl.float32)
    acc_c = tl.zeros([BNB], dtype=tl.float32)
    acc_u = tl.zeros([BNB], dtype=tl.float32)
    acc_r = tl.zeros([BNB], dtype=tl.float32)
    for c0 in range(0, tl.cdiv(L, K), BNB):
        b_d, b_m, o_pos, m_in = _load_delta(logp_ptr, old_ptr, mask_ptr, i_b, c0, L, s_lp, s_old, s_m,
                                            K, BNB, BK)
        kappa, dkappa = _kl_terms(b_d, KL)
        acc_kl += tl.sum(tl.where(b_m, kappa, 0.0), axis=1)
        b_n = tl.sum(b_m.to(tl.float32), axis=1)  # [BNB]
        acc_n += b_n
        if LEVEL == 0:
            acc_d += tl.sum(b_d, axis=1)
        elif LEVEL == 1:
            ratio = tl.exp(_clamp_log_ratio(tl.sum(b_d, axis=1) / tl.maximum(b_n, 1.0)))
            obj, keep = _clipped(ratio, a, LO, HI)
            unit = b_n > 0
            acc_j += tl.where(unit, b_n * obj, 0.0)
            acc_c += tl.where(unit & (keep == 0), 1.0, 0.0)
            acc_u += tl.where(unit, 1.0, 0.0)
            acc_r += tl.where(unit, ratio, 0.0)
        else:
            ratio = tl.exp(_clamp_log_ratio(b_d))  # [BNB, BK]
            obj, keep = _clipped(ratio, a, LO, HI)
            acc_j += tl.sum(tl.where(b_m, obj, 0.0), axis=1)
            acc_c += tl.sum(tl.where(b_m & (keep == 0), 1.0, 0.0), axis=1)
            acc_u += tl.sum(tl.where(b_m, 1.0, 0.0), axis=1)
            acc_r += tl.sum(tl.where(b_m, ratio, 0.0), axis=1)
    n = tl.sum(acc_n, axis=0)
    if LEVEL == 0:
        ratio = tl.exp(_clamp_log_ratio(tl.sum(acc_d, axis=0) / tl.maximum(n, 1.0)))
        obj, keep = _clipped(ratio, a, LO, HI)
        unit = n > 0
        j = tl.where(unit, obj, 0.0)
        c = tl.where(unit & (keep == 0), 1.0, 0.0)
        u = tl.where(unit, 1.0, 0.0)
        r = tl.where(unit, ratio, 0.0)
    else:
        j = tl.sum(acc_j, axis=0) / l1
        c = tl.sum(acc_c, axis=0)
        u = tl.sum(acc_u, axis=0)
        r = tl.sum(acc_r, axis=0)
    p_out = rows_ptr + i_b * 6
    tl.store(p_out + 0, j)
    tl.store(p_out + 1, tl.sum(acc_kl, axis=0) / l1)
    tl.store(p_out + 2, n)
    tl.store(p_out + 3, c)
    tl.store(p_out + 4, u)
    tl.store(p_out + 5, r)


@triton.jit
def _slim_policy_loss_bwd_kernel(gl_ptr, logp_ptr, old_ptr, mask_ptr, adv_ptr, w_ptr, grad_ptr, B, L, L1,
                                 s_lp, s_old, s_m, s_g,
                                 K: tl.constexpr, BNB: tl.constexpr, BK: tl.constexpr, LEVEL: tl.constexpr,
                                 KL: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, KL_COEF: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    a = tl.load(adv_ptr + i_b).to(tl.float32)
    l1 = L1.to(tl.float32)
    scale = tl.load(gl_ptr).to(tl.float32) * tl.load(w_ptr + i_b).to(tl.float32) / B.to(tl.float32)
    gs = 0.0
    if LEVEL == 0:
        acc_n = tl.zeros([BNB], dtype=tl.float32)
        acc_d = tl.zeros([BNB], dtype=tl.float32)
        for c0 in range(0, tl.cdiv(L, K), BNB):
            b_d, b_m, o_pos, m_in = _load_delta(logp_ptr, old_ptr, mask_ptr, i_b, c0, L, s_lp, s_old, s_m,
                                                K, BNB, BK)
            acc_n += tl.sum(b_m.to(tl.float32), axis=1)
            acc_d += tl.sum(b_d, axis=1)
        n = tl.sum(acc_n, axis=0)
        raw = tl.sum(acc_d, axis=0) / tl.maximum(n, 1.0)
        ratio = tl.exp(_clamp_log_ratio(raw))
        obj, keep = _clipped(ratio, a, LO, HI)
        gs = tl.where(keep & (tl.abs(raw) <= 10.0), a * ratio, 0.0) / tl.maximum(n, 1.0)
    for c0 in range(0, tl.cdiv(L, K), BNB):
        b_d, b_m, o_pos, m_in = _load_delta(logp_ptr, old_ptr, mask_ptr, i_b, c0, L, s_lp, s_old, s_m,
                                            K, BNB, BK)
        kappa, dkappa = _kl_terms(b_d, KL)
        if LEVEL == 0:
            dj = tl.zeros([BNB, BK], dtype=tl.float32) + gs
        elif LEVEL == 1:
            b_n = tl.sum(b_m.to(tl.float32), axis=1)
            raw = tl.sum(b_d, axis=1) / tl.maximum(b_n, 1.0)
            ratio = tl.exp(_clamp_log_ratio(raw))
            obj, keep = _clipped(ratio, a, LO, HI)
            g_blk = tl.where(keep & (tl.abs(raw) <= 10.0), a * ratio, 0.0) / l1  # [BNB]
            dj = tl.zeros([BNB, BK], dtype=tl.float32) + g_blk[:, None]
        else:
            ratio = tl.exp(_clamp_log_ratio(b_d))
            obj, keep = _clipped(ratio, a, LO, HI)
            dj = tl.where(keep & (tl.abs(b_d) <= 10.0), a * ratio, 0.0) / l1
        b_g = tl.where(b_m, scale * (KL_COEF * (dkappa / l1) - dj), 0.0)
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


def policy_loss_rows_triton(logp, logp_old, loss_mask, advantages, *, level, lo, hi, kl_estimator, L1,
                            block_size):
    """Per-row statistics [B, 6] (see ``slim_ops.ops.policy_loss.op.ROW_STATS``)."""
    B, L = logp.shape
    logp, logp_old, m = _prep(logp, logp_old, loss_mask)
    rows = torch.full((B, N_STATS), float("nan"), dtype=torch.float32, device=logp.device)
    K, BNB, BK = _tiles(level, L, block_size)
    _slim_policy_loss_fwd_kernel[(B,)](logp, logp_old, m, advantages.contiguous(), rows, L, int(L1),
                                       logp.stride(0), logp_old.stride(0), m.stride(0),
                                       K=K, BNB=BNB, BK=BK, LEVEL=LEVEL_ID[level], KL=KL_ID[kl_estimator],
                                       LO=float(lo), HI=float(hi), num_warps=4)
    return rows


def policy_loss_grad_triton(grad_loss, logp, logp_old, loss_mask, advantages, weights, *, level, lo, hi,
                            kl_coef, kl_estimator, L1, block_size):
    """∂L/∂logp [B, L] in logp's dtype (every position written)."""
    B, L = logp.shape
    logp, logp_old, m = _prep(logp, logp_old, loss_mask)
    grad = torch.empty_like(logp)
    K, BNB, BK = _tiles(level, L, block_size)
    _slim_policy_loss_bwd_kernel[(B,)](grad_loss.contiguous(), logp, logp_old, m, advantages.contiguous(),
                                       weights.contiguous(), grad, B, L, int(L1), logp.stride(0),
                                       logp_old.stride(0), m.stride(0), grad.stride(0),
                                       K=K, BNB=BNB, BK=BK, LEVEL=LEVEL_ID[level], KL=KL_ID[kl_estimator],
                                       LO=float(lo), HI=float(hi), KL_COEF=float(kl_coef), num_warps=4)
    return grad


def _aot_specs() -> list[AotSpec]:
    specs = []
    for level, kl, (K, BNB, BK) in (("sequence", "k3", (256, 1, 256)), ("sequence", "k2", (256, 1, 256)),
                                    ("sequence", "k1", (1024, 1, 1024)), ("block", "k3", (16, 16, 16)),
                                    ("token", "k3", (256, 1, 256))):
        const = {"K": K, "BNB": BNB, "BK": BK, "LEVEL": LEVEL_ID[level], "KL": KL_ID[kl],
                 "LO": 0.9, "HI": 1.1}
        label = f"{level} {kl} K={K} BNB={BNB}"
        specs.append(AotSpec(_slim_policy_loss_fwd_kernel,
                             {"logp_ptr": "*fp32", "old_ptr": "*fp32", "mask_ptr": "*u8", "adv_ptr": "*fp32",
                              "rows_ptr": "*fp32", "L": "i32", "L1": "i32", "s_lp": "i32", "s_old": "i32",
                              "s_m": "i32", **{k: "constexpr" for k in const}}, const, num_warps=4,
                             label=label, ints=dict.fromkeys(("L", "s_lp", "s_old", "s_m"), 2048)))
        const_b = dict(const, KL_COEF=0.01)
        specs.append(AotSpec(_slim_policy_loss_bwd_kernel,
                             {"gl_ptr": "*fp32", "logp_ptr": "*fp32", "old_ptr": "*fp32", "mask_ptr": "*u8",
                              "adv_ptr": "*fp32", "w_ptr": "*fp32", "grad_ptr": "*fp32", "B": "i32",
                              "L": "i32", "L1": "i32", "s_lp": "i32", "s_old": "i32", "s_m": "i32",
                              "s_g": "i32",
                              **{k: "constexpr" for k in const_b}}, const_b, num_warps=4, label=label,
                             ints=dict.fromkeys(("L", "s_lp", "s_old", "s_m", "s_g"), 2048)))
    return specs


AOT_SPECS = _aot_specs()
