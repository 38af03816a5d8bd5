"""Triton backend of the decode step: one online pass over V per slot, then one program per row that
ranks the K <= 64 slots in registers and runs the exact fp32 budget scan (docs/decode.md, 'The τ-budget rule').

With ``ENTROPY`` (strategy entropy_bounded) the same pass also yields the entropy of the slot's distribution
(reference.py: H = log S − Σ e·d / S, d = z' − max z'): each lane keeps W = Σ e^{z'−m}·(z'−m) relative to its
running max m and rescales it with the sum when m grows (W ← e^{m−m'}·(W + (m − m')·S)); every term of W is <= 0,
so the rescaling and the final lane merge add numbers of one sign (no cancellation in fp32). The selection of
entropy_bounded runs in the shared vectorised selection (torch_impl.select_torch) on the kernel's outputs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from slim_ops._aot import AotSpec
from slim_ops._backend import triton_interpret


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


LN2 = tl.constexpr(0.6931471805599453)
# Above every Gumbel value the kernel computes: u <= 1 - 2^-24 gives g <= -ln(-ln(1 - 2^-24)) = 16.6355, plus at
# most ~1e-6 of fast-log error. Tiles whose largest z/T plus G_MAX cannot beat the running best skip the noise.
G_MAX = tl.constexpr(16.75)
NUM_STAGES = tl.constexpr(4)  # cp.async pipeline depth of the streaming loop over V


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_log2f(x)  # lg2.approx: one MUFU instruction, absolute error <= 2^-22
    else:
        return tl.log2(x)  # the interpreter has no libdevice


@triton.jit
def _gumbel(u, FAST: tl.constexpr):
    """g = -ln(-ln u) for u in [2^-24, 1 - 2^-24] (reference.py). w = -ln u: for u > 7/8 the series
    e + e^2/2 + ... + e^8/8 of -ln(1 - e), e = 1 - u exact (relative error < 1e-8; an absolute-error log
    would lose the large g that win the argmax); below, -ln2·log2(u) with |log2 u| > 0.19 (relative error
    < 1.3e-6 with lg2.approx). Then g = -ln2·log2(w) (absolute error < 2e-7)."""
    e = 1.0 - u
    ser = e * (1.0 + e * (0.5 + e * (0.3333333432674408 + e * (0.25 + e * (0.20000000298023224 + e * (
        0.1666666716337204 + e * (0.1428571492433548 + e * 0.125)))))))
    w = tl.where(u > 0.875, ser, -LN2 * _log2(u, FAST))
    return -LN2 * _log2(w, FAST)


@triton.jit
def _entropy_update(b_w, b_s, d, e):
    """W of the lanes after one element z' with d = z' − m (m the lane's max before it) and e = exp(−|d|):
    a new max rescales the old terms, W ← e·(W − d·S) (the new term is e^0·0); otherwise W += e·d. Lanes
    without a finite element yet (S = 0) and −inf elements (e = 0) add nothing (never 0·inf)."""
    grow = tl.where(b_s > 0, e * (b_w - d * b_s), 0.0)
    add = tl.where(e > 0, e * d, 0.0)
    return tl.where(d > 0, grow, b_w + add)


@triton.jit
def _tau_budget_confidence_kernel(
    p_logits, p_tokens, p_conf, p_ent, p_seed, p_temp,
    K, V, stride_r, stride_k, mask_id,
    BV: tl.constexpr, GREEDY: tl.constexpr, FAST_LOG: tl.constexpr, ENTROPY: tl.constexpr,
):
    """One slot per program, one pass over V in [BV] tiles (per-lane online max / Σexp / argmax, merged at
    the end). Greedy: the first maximum. Sampling: Gumbel-max on z·(1/T); a tile runs the hash and the
    logs only when its largest z/T + G_MAX can beat the running best (ties go to the earlier index, so
    a tile that can only tie is skipped too). Loads are cp.async-pipelined (NUM_STAGES).
    ENTROPY: also the per-lane W = Σ e^{z'−m}(z'−m) (module docstring), accumulated for every element of
    every tile (outside the noise skip), and the entropy stored to p_ent (NaN for invalid slots)."""
    i_s = tl.program_id(0)
    i_r = i_s // K
    i_j = i_s % K
    p_row = p_logits + i_r.to(tl.int64) * stride_r + i_j.to(tl.int64) * stride_k
    o_v = tl.arange(0, BV)
    b_m = tl.full([BV], float("-inf"), tl.float32)
    b_s = tl.zeros([BV], tl.float32)
    b_idx = tl.zeros([BV], tl.int32)
    b_bad = tl.zeros([BV], tl.int32)
    b_w = tl.zeros([BV], tl.float32)  # Σ e^{z'−m}(z'−m) per lane (ENTROPY only; dead code otherwise)
    if GREEDY:
        for i_v in tl.range(0, V, BV, num_stages=NUM_STAGES):
            o = i_v + o_v
            b_z = tl.load(p_row + o, mask=o < V, other=float("-inf")).to(tl.float32)  # [BV]
            b_bad = b_bad | ((b_z != b_z) | (b_z == float("inf"))).to(tl.int32)
            d = b_z - b_m
            e = tl.where(b_z == float("-inf"), 0.0, tl.exp(-tl.abs(d)))
            b_idx = tl.where(d > 0, o, b_idx)  # strict: the lane keeps its first maximum
            if ENTROPY:
                b_w = _entropy_update(b_w, b_s, d, e)
            b_s = tl.where(d > 0, b_s * e + 1.0, b_s + e)
            b_m = tl.maximum(b_m, b_z)
        mx = tl.max(b_m, axis=0)
        s = tl.sum(tl.where(b_m == float("-inf"), 0.0, b_s * tl.exp(b_m - mx)), axis=0)
        idx = tl.min(tl.where(b_m == mx, b_idx, V), axis=0)
        c = 1.0 / s
    else:
        inv_t = 1.0 / tl.load(p_temp)
        seed = tl.load(p_seed)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        key = _mix32(hi ^ _mix32(lo + i_s.to(tl.uint32))) + tl.zeros([BV], tl.uint32)
        b_best = tl.full([BV], float("-inf"), tl.float32)
        b_zb = tl.full([BV], float("-inf"), tl.float32)
        best = float("-inf")
        for i_v in tl.range(0, V, BV, num_stages=NUM_STAGES):
            o = i_v + o_v
            b_z = tl.load(p_row + o, mask=o < V, other=float("-inf")).to(tl.float32)  # [BV]
            b_bad = b_bad | ((b_z != b_z) | (b_z == float("inf"))).to(tl.int32)
            b_z = b_z * inv_t
            d = b_z - b_m
            e = tl.where(b_z == float("-inf"), 0.0, tl.exp(-tl.abs(d)))
            if ENTROPY:  # every tile, also those whose noise is skipped below
                b_w = _entropy_update(b_w, b_s, d, e)
            b_s = tl.where(d > 0, b_s * e + 1.0, b_s + e)
            b_m = tl.maximum(b_m, b_z)
            if tl.max(b_z, axis=0) + G_MAX > best:
                bits = _mix32(key + o.to(tl.uint32) * 0x9E3779B9)
                u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
                score = b_z + _gumbel(u, FAST_LOG)
                upd = score > b_best
                b_best = tl.where(upd, score, b_best)
                b_idx = tl.where(upd, o, b_idx)
                b_zb = tl.where(upd, b_z, b_zb)
                best = tl.maximum(best, tl.max(score, axis=0))
        mx = tl.max(b_m, axis=0)
        s = tl.sum(tl.where(b_m == float("-inf"), 0.0, b_s * tl.exp(b_m - mx)), axis=0)
        top = tl.max(b_best, axis=0)
        idx = tl.min(tl.where(b_best == top, b_idx, V), axis=0)
        zb = tl.max(tl.where(b_idx == idx, b_zb, float("-inf")), axis=0)
        c = tl.exp(zb - mx) / s
    bad = (tl.max(b_bad, axis=0) > 0) | (mx == float("-inf"))
    tl.store(p_tokens + i_s, tl.where(bad, mask_id, idx).to(tl.int64))
    tl.store(p_conf + i_s, tl.where(bad, float("nan"), c))
    if ENTROPY:
        # lanes merged at the slot max: W = Σ_l e^{m_l−mx}(W_l + (m_l − mx)·S_l), all terms <= 0
        dl = b_m - mx
        w = tl.sum(tl.where(b_m == float("-inf"), 0.0, tl.exp(dl) * (b_w + dl * b_s)), axis=0)
        h = tl.maximum(tl.log(s) - w / s, 0.0)
        tl.store(p_ent + i_s, tl.where(bad, float("nan"), h))


@triton.jit
def _tau_budget_select_kernel(
    p_conf, p_tokens, p_block, p_masked, p_tau, p_bud, p_floor,
    p_commit, p_block_out, p_num, p_risk,
    K, mask_id, stride_br, stride_bk,
    BK: tl.constexpr, STRATEGY: tl.constexpr, FROM_BLOCK: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_rk = i_r.to(tl.int64) * K + o_k
    b_c = tl.load(p_conf + o_rk, mask=m_k, other=0.0)  # [BK]
    if FROM_BLOCK:
        b_blk = tl.load(p_block + i_r.to(tl.int64) * stride_br + o_k * stride_bk, mask=m_k, other=0)
        b_masked = m_k & (b_blk == mask_id)
    else:
        b_masked = m_k & (tl.load(p_masked + o_rk, mask=m_k, other=0) != 0)
    b_elig = b_masked & (b_c == b_c)
    b_key = tl.where(b_elig, b_c, float("-inf"))
    # rank of slot j in (confidence desc, index asc) order: [BK, BK] pairwise comparison
    ki = b_key[:, None]
    kj = b_key[None, :]
    before = (ki > kj) | ((ki == kj) & (o_k[:, None] < o_k[None, :]))
    b_rank = tl.sum(before.to(tl.int32), axis=0)  # [BK]
    tau = tl.load(p_tau + i_r)
    bud = tl.load(p_bud + i_r)
    f = tl.load(p_floor + i_r)
    b_above = b_elig & (b_c > tau)
    n_above = tl.sum(b_above.to(tl.int32), axis=0)
    n_elig = tl.sum(b_elig.to(tl.int32), axis=0)
    b_u = tl.where(b_elig, 1.0 - b_c, 0.0)
    if STRATEGY == 0:
        total = 0.0
        k_b = 0
        for r in range(0, K):
            total += tl.sum(tl.where(b_above & (b_rank == r), b_u, 0.0), axis=0)
            k_b += ((r < n_above) & (total <= bud)).to(tl.int32)
        k = tl.minimum(tl.maximum(k_b, f), n_elig)
    elif STRATEGY == 1:
        k = tl.minimum(tl.maximum(n_above, f), n_elig)
    else:
        k = tl.minimum(f, n_elig)
    b_commit = b_elig & (b_rank < k)
    risk = 0.0
    for r in range(0, K):
        risk += tl.sum(tl.where(b_commit & (b_rank == r), b_u, 0.0), axis=0)
    tl.store(p_commit + o_rk, b_commit, mask=m_k)
    tl.store(p_num + i_r, k.to(tl.int32))
    tl.store(p_risk + i_r, risk)
    if FROM_BLOCK:
        b_tok = tl.load(p_tokens + o_rk, mask=m_k, other=0)
        tl.store(p_block_out + o_rk, tl.where(b_commit, b_tok, b_blk), mask=m_k)


_BV_MAX = 1024
_BV_CHOICES = (256, 512, 1024)  # >= 256: 4 warps x >= 4 bytes per thread, the cp.async minimum
_NUM_WARPS_V = 4


def _bv(V: int) -> int:
    return min(_BV_MAX, max(_BV_CHOICES[0], triton.next_power_of_2(V)))


def _bk(K: int) -> int:
    return max(2, triton.next_power_of_2(K))


def _select_launch(conf, tokens, block, masked, mask_id, tau32, bud, floor, strategy_id, from_block):
    R, K = conf.shape
    dev = conf.device
    commit = torch.empty(R, K, dtype=torch.bool, device=dev)
    num = torch.empty(R, dtype=torch.int32, device=dev)
    risk = torch.empty(R, dtype=torch.float32, device=dev)
    block_out = torch.empty(R, K, dtype=torch.int64, device=dev) if from_block else commit
    if R == 0:
        return commit, num, risk, block_out
    blk = block if from_block else conf
    _tau_budget_select_kernel[(R,)](
        conf, tokens if from_block else conf, blk, masked if masked is not None else conf,
        tau32, bud, floor, commit, block_out, num, risk,
        K, mask_id, blk.stride(0), blk.stride(1),
        BK=_bk(K), STRATEGY=strategy_id, FROM_BLOCK=from_block, num_warps=1 if K <= 32 else 2,
    )
    return commit, num, risk, block_out


def slot_pass_triton(logits, mask_id, seed, temperature, entropy=False, out=None):
    """(tokens [R,K] int64, confidence [R,K] fp32[, entropy [R,K] fp32]) of every slot from one pass over V,
    written into ``out`` (the same tuple of contiguous buffers) when given."""
    R, K, V = logits.shape
    dev = logits.device
    if out is not None:
        tokens, conf = out[0], out[1]
        ent = out[2] if entropy else None
    else:
        tokens = torch.empty(R, K, dtype=torch.int64, device=dev)
        conf = torch.empty(R, K, dtype=torch.float32, device=dev)
        ent = torch.empty(R, K, dtype=torch.float32, device=dev) if entropy else None
    greedy = temperature == 0.0
    temp = torch.full((1,), max(temperature, 1e-30), dtype=torch.float32, device=dev)
    if R > 0:
        _tau_budget_confidence_kernel[(R * K,)](
            logits, tokens, conf, ent if entropy else conf, seed, temp, K, V, logits.stride(0), logits.stride(1),
            mask_id, BV=_bv(V), GREEDY=greedy, FAST_LOG=not triton_interpret(), ENTROPY=entropy,
            num_warps=_NUM_WARPS_V,
        )
    return (tokens, conf, ent) if entropy else (tokens, conf)


def tau_budget_step_triton(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id):
    tokens, conf = slot_pass_triton(logits, mask_id, seed, temperature)
    commit, num, risk, block_out = _select_launch(conf, tokens, block, None, mask_id, tau32, bud, floor,
                                                  strategy_id, True)
    return block_out, commit, tokens, conf, num, risk


def tau_budget_step_entropy_triton(logits, block, mask_id, tau32, bud, floor, seed, temperature, sparam,
                                   defer_ids=None):
    """entropy_bounded: tokens, confidence and entropy from the fused slot pass (ENTROPY), ``defer_ids`` applied,
    then the shared vectorised selection (torch_impl.select_torch, on the device, no host sync)."""
    from .torch_impl import defer_slots, select_torch

    tokens, conf, ent = slot_pass_triton(logits, mask_id, seed, temperature, entropy=True)
    if defer_ids is not None:
        conf, ent = defer_slots(tokens, conf, ent, defer_ids)
    commit, num, risk = select_torch(conf, block == mask_id, tau32, bud, floor, 3, sparam, ent)
    return torch.where(commit, tokens, block), commit, tokens, conf, num, risk


def tau_budget_select_triton(conf, masked, tau32, bud, floor, strategy_id):
    commit, num, risk, _ = _select_launch(conf.contiguous(), None, None, masked.contiguous(), 0, tau32, bud, floor,
                                          strategy_id, False)
    return commit, num, risk


_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AOT_SPECS = [
    AotSpec(_tau_budget_confidence_kernel,
            {"p_logits": f"*{dt}", "p_tokens": "*i64", "p_conf": "*fp32", "p_ent": "*fp32", "p_seed": "*i64",
             "p_temp": "*fp32", "K": "i32", "V": "i32", "stride_r": "i64", "stride_k": "i64", "mask_id": "i32",
             "BV": "constexpr", "GREEDY": "constexpr", "FAST_LOG": "constexpr", "ENTROPY": "constexpr"},
            {"BV": bv, "GREEDY": greedy, "FAST_LOG": True, "ENTROPY": ent}, num_warps=_NUM_WARPS_V,
            label=f"{dt} BV={bv} greedy={greedy}{' ent' if ent else ''}",
            ints={"K": 16, "V": 151936, "stride_r": 16 * 151936, "stride_k": 151936}, streaming=True)
    for ent in (False, True) for dt in _DT for greedy in (True, False) for bv in _BV_CHOICES
] + [
    AotSpec(_tau_budget_select_kernel,
            {"p_conf": "*fp32", "p_tokens": "*i64", "p_block": "*i64" if fb else "*fp32",
             "p_masked": "*fp32" if fb else "*i1", "p_tau": "*fp32", "p_bud": "*fp32", "p_floor": "*i32",
             "p_commit": "*i1", "p_block_out": "*i64" if fb else "*i1", "p_num": "*i32", "p_risk": "*fp32",
             "K": "i32", "mask_id": "i32", "stride_br": "i64", "stride_bk": "i64",
             "BK": "constexpr", "STRATEGY": "constexpr", "FROM_BLOCK": "constexpr"},
            {"BK": bk, "STRATEGY": st, "FROM_BLOCK": fb}, num_warps=1 if bk <= 32 else 2,
            label=f"BK={bk} strategy={st} step={fb}", ints={"K": bk, "stride_br": bk, "stride_bk": 1})
    for bk in (16, 64) for st in (0, 1, 2) for fb in (True, False)
]
