"""Triton kernels for masked log-probs (docs/objective.md, 'Log-probabilities').

``_masked_logprob_fwd_kernel``: [BN rows] x [one vocabulary split] per program; tiles z = h·Wᵀ/T of
[BN, BV] (loop over d in BD steps, fp32 accumulation), online max / Σexp / centred Σexp·z and the label
logit; partial states of the splits are merged on the device. Nothing of size [N, V] is written.
``_masked_logprob_bwd_kernel``: recomputes z for one vocabulary chunk and writes
dz = g·(onehot − softmax)/T for that chunk only; dhidden += dz·W_c and dW_c = dzᵀ·h follow as GEMMs.
``_logprob_from_logits_{fwd,bwd}_kernel``: one program per row, one pass over the row's logits.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from slim_ops._aot import AotSpec
from slim_ops._backend import triton_interpret

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ROW_STAGES = tl.constexpr(3)  # pipeline depth of the logprob_from_logits row loops


@triton.jit
def _logits_tile(h_ptr, w_ptr, N, V, D, row0, col0,
                 BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, DOT_F32: tl.constexpr):
    """hidden[row0:row0+BN] · weight[col0:col0+BV]ᵀ accumulated in fp32 over D in BD steps."""
    p_h = tl.make_block_ptr(h_ptr, (N, D), (D, 1), (row0, 0), (BN, BD), (1, 0))
    p_w = tl.make_block_ptr(w_ptr, (D, V), (1, D), (0, col0), (BD, BV), (0, 1))
    acc = tl.zeros([BN, BV], dtype=tl.float32)
    for _ in range(0, tl.cdiv(D, BD)):
        b_h = tl.load(p_h, boundary_check=(0, 1), padding_option="zero")  # [BN, BD]
        b_w = tl.load(p_w, boundary_check=(0, 1), padding_option="zero")  # [BD, BV]
        if DOT_F32:
            acc = tl.dot(b_h.to(tl.float32), b_w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(b_h, b_w, acc)
        p_h = tl.advance(p_h, (0, BD))
        p_w = tl.advance(p_w, (BD, 0))
    return acc


@triton.jit
def _masked_logprob_fwd_kernel(h_ptr, w_ptr, y_ptr, part_ptr, N, V, D, v_split,
                               INV_T: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
                               ENTROPY: tl.constexpr, DOT_F32: tl.constexpr):
    i_s = tl.program_id(0)  # the split varies fastest: programs in flight share row blocks (L2)
    i_n = tl.program_id(1)
    n_split = tl.num_programs(0)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = o_n < N
    b_y = tl.load(y_ptr + o_n, mask=m_n, other=-1)
    v_lo = i_s * v_split
    v_hi = tl.minimum(v_lo + v_split, V)
    b_m = tl.full([BN], float("-inf"), dtype=tl.float32)
    b_s = tl.zeros([BN], dtype=tl.float32)
    b_t = tl.zeros([BN], dtype=tl.float32)
    b_zy = tl.zeros([BN], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BV):
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_hi
        acc = _logits_tile(h_ptr, w_ptr, N, V, D, i_n * BN, v0, BN, BV, BD, DOT_F32)  # [BN, BV]
        b_z = tl.where(m_v[None, :], acc * INV_T, float("-inf"))  # [BN, BV]
        m_new = tl.maximum(b_m, tl.max(b_z, axis=1))
        alpha = tl.exp(b_m - m_new)
        b_zc = b_z - m_new[:, None]
        b_e = tl.exp(b_zc)
        if ENTROPY:
            carried = alpha * (b_t + tl.where(b_s > 0, b_m - m_new, 0.0) * b_s)
            b_t = carried + tl.sum(b_e * tl.where(m_v[None, :], b_zc, 0.0), axis=1)
        b_s = b_s * alpha + tl.sum(b_e, axis=1)
        b_zy += tl.sum(tl.where(o_v[None, :] == b_y[:, None], b_z, 0.0), axis=1)
        b_m = m_new
    p = part_ptr + i_s * N + o_n
    stride = n_split * N
    tl.store(p, b_m, mask=m_n)
    tl.store(p + stride, b_s, mask=m_n)
    tl.store(p + 2 * stride, b_t, mask=m_n)
    tl.store(p + 3 * stride, b_zy, mask=m_n)


@triton.jit
def _masked_logprob_bwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr, N, V, D, v_lo, v_cnt, s_dz,
                               INV_T: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
                               DOT_F32: tl.constexpr, GROUP: tl.constexpr):
    # grouped order: GROUP row blocks x every vocabulary tile of the chunk, so that the programs in flight
    # share row blocks of hidden and tiles of weight in L2
    pid = tl.program_id(0)
    n_rb = tl.cdiv(N, BN)
    n_vt = tl.cdiv(v_cnt, BV)
    per_group = GROUP * n_vt
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_rb - first, GROUP)
    i_n = first + (pid % per_group) % size
    i_v = (pid % per_group) // size
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = o_n < N
    o_c = (i_v * BV + tl.arange(0, BV)).to(tl.int64)  # column inside the chunk
    o_v = v_lo + o_c
    m_v = (o_c < v_cnt) & (o_v < V)
    acc = _logits_tile(h_ptr, w_ptr, N, V, D, i_n * BN, v_lo + i_v * BV, BN, BV, BD, DOT_F32)  # [BN, BV]
    b_y = tl.load(y_ptr + o_n, mask=m_n, other=-1)
    b_lse = tl.load(lse_ptr + o_n, mask=m_n, other=0.0)
    b_g = tl.load(g_ptr + o_n, mask=m_n, other=0.0).to(tl.float32) * INV_T
    b_p = tl.exp(acc * INV_T - b_lse[:, None])
    b_dz = b_g[:, None] * (tl.where(o_v[None, :] == b_y[:, None], 1.0, 0.0) - b_p)
    tl.store(dz_ptr + o_n[:, None] * s_dz + o_c[None, :], b_dz.to(dz_ptr.dtype.element_ty),
             mask=m_n[:, None] & m_v[None, :])


@triton.jit
def _logprob_from_logits_fwd_kernel(z_ptr, y_ptr, logp_ptr, lse_ptr, ent_ptr, V, s_z,
                                    INV_T: tl.constexpr, BV: tl.constexpr, ENTROPY: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    p_row = z_ptr + i_n * s_z
    b_m = tl.full([], float("-inf"), dtype=tl.float32)
    b_s = tl.zeros([], dtype=tl.float32)
    b_t = tl.zeros([], dtype=tl.float32)
    for v0 in tl.range(0, V, BV, num_stages=ROW_STAGES):  # cp.async pipeline over the row
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * INV_T
        m_new = tl.maximum(b_m, tl.max(b_z, axis=0))
        alpha = tl.exp(b_m - m_new)
        b_zc = b_z - m_new
        b_e = tl.exp(b_zc)
        if ENTROPY:
            carried = alpha * (b_t + tl.where(b_s > 0, b_m - m_new, 0.0) * b_s)
            b_t = carried + tl.sum(b_e * tl.where(m_v, b_zc, 0.0), axis=0)
        b_s = b_s * alpha + tl.sum(b_e, axis=0)
        b_m = m_new
    y = tl.load(y_ptr + i_n)
    zy = tl.load(p_row + y, mask=(y >= 0) & (y < V), other=float("nan")).to(tl.float32) * INV_T
    lse = b_m + tl.log(b_s)
    tl.store(logp_ptr + i_n, zy - lse)
    tl.store(lse_ptr + i_n, lse)
    if ENTROPY:
        tl.store(ent_ptr + i_n, tl.log(b_s) - b_t / b_s)


@triton.jit
def _logprob_from_logits_bwd_kernel(g_ptr, z_ptr, y_ptr, lse_ptr, dz_ptr, V, s_z, s_dz,
                                    INV_T: tl.constexpr, BV: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    g = tl.load(g_ptr + i_n).to(tl.float32) * INV_T
    lse = tl.load(lse_ptr + i_n)
    y = tl.load(y_ptr + i_n)
    for v0 in tl.range(0, V, BV, num_stages=ROW_STAGES):  # cp.async pipeline over the row
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        b_z = tl.load(z_ptr + i_n * s_z + o_v, mask=m_v, other=0.0).to(tl.float32) * INV_T
        b_dz = g * (tl.where(o_v == y, 1.0, 0.0) - tl.exp(b_z - lse))
        tl.store(dz_ptr + i_n * s_dz + o_v, b_dz.to(dz_ptr.dtype.element_ty), mask=m_v)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
# (BN, BV, BD, num_warps, num_stages): GPU tiles for the fused LM-head kernels; the interpreter uses
# the smallest legal tiles so that CPU tests stay fast.
#
# bf16/fp16: 128 x 128 tiles, BD = 64, 8 warps (two warpgroups, each wgmma m64n128k16), 4 cp.async
# stages (128 KiB shared memory): per D step the tile reads (BN + BV)·BD·2 B for 2·BN·BV·BD FLOP, 64 FLOP/B
# from shared memory/L2 (64 x 128: 43 FLOP/B, wgmma m64n64). The forward uses 255 registers, the backward
# 208, without spilling at sm_90a; the 64 x 128 forward used 190: one 256-thread CTA per SM either way, so
# the larger tile costs no occupancy. 128 x 256 (85 FLOP/B, m64n256) spills in both kernels; 256 x 128 spills in the
# backward
# (tests/test_compile.py and the AOT report hold these numbers). From HBM, a [BN, D] row block is re-read
# per vocabulary tile and a [D, BV] weight tile per row block; the program order (split or tile fastest,
# grouped) makes the ~2·sqrt(#SM) programs in flight share both in L2.
# The alternative, cuBLAS for a logits chunk plus a fused row kernel, writes and re-reads [N, Vc] fp32
# logits (8 B per logit for 2·D FLOP: 1024 FLOP/B at D = 4096, ~20% on top of a 700 TFLOP/s GEMM at
# 3.35 TB/s) and is what the torch backend does; the fused kernels write nothing of size [N, V]. Which is
# faster on a GPU is for benchmarks/ to say; the compiled code of the fused kernels is as above.
GPU_TILES = {torch.bfloat16: (128, 128, 64, 8, 4), torch.float16: (128, 128, 64, 8, 4),
             torch.float32: (64, 64, 32, 8, 2)}  # zero spills on sm_90a (tests/test_compile.py)
INTERPRET_TILES = (32, 128, 32, 4, 1)
BWD_GROUP = 8  # row blocks per group of the backward's program order
BWD_CHUNK_ELEMS = 1 << 26  # dz chunk [N, Vc]: 128 MiB in bf16


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs for ~2 waves of one CTA per SM (the 255-register tiles fit once per SM)."""
    if triton_interpret() or device.type != "cuda":
        return 2
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _splits(n_rb: int, n_vt: int, device: torch.device) -> int:
    """Vocabulary splits of the forward: enough programs for ~2 waves, and at least ~sqrt(#programs in
    flight) splits so that those programs share both row blocks and weight tiles in L2."""
    target = _target_programs(device)
    return max(1, min(n_vt, max(triton.cdiv(target, n_rb), math.isqrt(target // 2) + 1)))


def _tiles(dtype: torch.dtype):
    return INTERPRET_TILES if triton_interpret() else GPU_TILES[dtype]


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or triton_interpret()


def masked_logprob_fwd_triton(hidden, weight, labels, temperature: float, with_entropy: bool):
    N, D = hidden.shape
    V = weight.shape[0]
    if N == 0:
        e = torch.empty(0, device=hidden.device)
        return e, e.clone(), e.clone()
    BN, BV, BD, nw, ns = _tiles(hidden.dtype)
    n_rb = triton.cdiv(N, BN)
    n_vt = triton.cdiv(V, BV)
    splits = _splits(n_rb, n_vt, hidden.device)
    v_split = triton.cdiv(n_vt, splits) * BV
    splits = triton.cdiv(V, v_split)  # every split holds at least one column
    part = torch.empty((4, splits, N), dtype=torch.float32, device=hidden.device)
    _masked_logprob_fwd_kernel[(splits, n_rb)](hidden, weight, labels, part, N, V, D, v_split,
                                               INV_T=1.0 / temperature, BN=BN, BV=BV, BD=BD,
                                               ENTROPY=with_entropy, DOT_F32=_dot_f32(hidden.dtype),
                                               num_warps=nw, num_stages=ns)
    pm, ps, pt, pzy = part.unbind(0)
    m = pm.max(0).values
    scale = torch.exp(pm - m)
    s = (ps * scale).sum(0)
    lse = m + torch.log(s)
    logp = pzy.sum(0) - lse
    if with_entropy:
        t = (scale * (pt + (pm - m) * ps)).sum(0)
        ent = torch.log(s) - t / s
    else:
        ent = torch.empty(0, device=hidden.device)
    return logp, lse, ent


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from slim_ops.ops.masked_logprob.op import _mm_f32 as mm

    return mm(a, b)


def masked_logprob_bwd_triton(grad_logp, hidden, weight, labels, lse, temperature: float,
                              need_dh: bool = True, need_dw: bool = True):
    N, D = hidden.shape
    V = weight.shape[0]
    BN, BV, BD, nw, ns = _tiles(hidden.dtype)
    dh = torch.zeros((N if need_dh else 0, D), dtype=torch.float32, device=hidden.device)
    dw = torch.empty_like(weight) if need_dw else weight.new_empty((0, D))
    if N == 0 or not (need_dh or need_dw):
        return dh.to(hidden.dtype), dw.zero_()
    vc = max(BV, (BWD_CHUNK_ELEMS // max(N, 1)) // BV * BV)
    vc = min(vc, triton.cdiv(V, BV) * BV)
    dz = torch.empty((N, vc), dtype=hidden.dtype, device=hidden.device)
    for v0 in range(0, V, vc):
        cnt = min(vc, V - v0)
        _masked_logprob_bwd_kernel[(triton.cdiv(N, BN) * triton.cdiv(cnt, BV),)](
            hidden, weight, labels, lse, grad_logp, dz, N, V, D, v0, cnt, dz.stride(0),
            INV_T=1.0 / temperature, BN=BN, BV=BV, BD=BD, DOT_F32=_dot_f32(hidden.dtype), GROUP=BWD_GROUP,
            num_warps=nw, num_stages=ns)
        dzc = dz[:, :cnt]
        wc = weight[v0:v0 + cnt]
        if need_dh:
            dh += _mm_f32(dzc, wc)
        if need_dw:
            dw[v0:v0 + cnt] = _mm_f32(dzc.t(), hidden).to(weight.dtype)
    return dh.to(hidden.dtype), dw


def _row_block(V: int) -> int:
    return min(triton.next_power_of_2(max(V, 16)), 256 if triton_interpret() else 4096)


def logprob_from_logits_fwd_triton(logits, labels, temperature: float, with_entropy: bool):
    N, V = logits.shape
    dev = logits.device
    logp = torch.full((N,), float("nan"), device=dev)
    lse = torch.full((N,), float("nan"), device=dev)
    ent = torch.full((N if with_entropy else 0,), float("nan"), device=dev)
    if N > 0:
        _logprob_from_logits_fwd_kernel[(N,)](logits, labels, logp, lse, ent if with_entropy else logp, V,
                                              logits.stride(0), INV_T=1.0 / temperature, BV=_row_block(V),
                                              ENTROPY=with_entropy, num_warps=8)
    return logp, lse, ent


def logprob_from_logits_bwd_triton(grad_logp, logits, labels, lse, temperature: float):
    N, V = logits.shape
    dz = torch.empty_like(logits)
    if N > 0:
        _logprob_from_logits_bwd_kernel[(N,)](grad_logp, logits, labels, lse, dz, V, logits.stride(0),
                                              dz.stride(0), INV_T=1.0 / temperature, BV=_row_block(V),
                                              num_warps=8)
    return dz


_AOT_V, _AOT_D = 151936, 4096  # launch values the AOT report specialises for (a 151936-token vocabulary)


def _aot_specs() -> list[AotSpec]:
    specs = []
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dt, ent in (("bf16", True), ("bf16", False), ("fp16", True), ("fp32", True)):
        BN, BV, BD, nw, ns = GPU_TILES[tdt[dt]]
        const = {"INV_T": 1.0, "BN": BN, "BV": BV, "BD": BD, "ENTROPY": ent, "DOT_F32": dt == "fp32"}
        specs.append(AotSpec(_masked_logprob_fwd_kernel,
                             {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": "*i64", "part_ptr": "*fp32",
                              "N": "i32", "V": "i32", "D": "i32", "v_split": "i32",
                              **{k: "constexpr" for k in const}}, const, num_warps=nw, num_stages=ns,
                             label=f"{dt} entropy={ent}", ints={"V": _AOT_V, "D": _AOT_D, "v_split": 8 * BV}))
    for dt in ("bf16", "fp16", "fp32"):
        BN, BV, BD, nw, ns = GPU_TILES[tdt[dt]]
        const = {"INV_T": 1.0, "BN": BN, "BV": BV, "BD": BD, "DOT_F32": dt == "fp32", "GROUP": BWD_GROUP}
        specs.append(AotSpec(_masked_logprob_bwd_kernel,
                             {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": "*i64", "lse_ptr": "*fp32",
                              "g_ptr": "*fp32", "dz_ptr": f"*{dt}", "N": "i32", "V": "i32", "D": "i32",
                              "v_lo": "i32", "v_cnt": "i32", "s_dz": "i32",
                              **{k: "constexpr" for k in const}}, const, num_warps=nw, num_stages=ns,
                             label=dt, ints={"V": _AOT_V, "D": _AOT_D, "v_lo": 0, "s_dz": 64 * BV}))
    for dt in ("bf16", "fp32"):
        const = {"INV_T": 1.0, "BV": 4096, "ENTROPY": True}
        specs.append(AotSpec(_logprob_from_logits_fwd_kernel,
                             {"z_ptr": f"*{dt}", "y_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
                              "ent_ptr": "*fp32", "V": "i32", "s_z": "i32",
                              **{k: "constexpr" for k in const}}, const, num_warps=8, label=dt,
                             ints={"V": _AOT_V, "s_z": _AOT_V}, streaming=True))
        const = {"INV_T": 1.0, "BV": 4096}
        specs.append(AotSpec(_logprob_from_logits_bwd_kernel,
                             {"g_ptr": "*fp32", "z_ptr": f"*{dt}", "y_ptr": "*i64", "lse_ptr": "*fp32",
                              "dz_ptr": f"*{dt}", "V": "i32", "s_z": "i32", "s_dz": "i32",
                              **{k: "constexpr" for k in const}}, const, num_warps=8, label=dt,
                             ints={"V": _AOT_V, "s_z": _AOT_V, "s_dz": _AOT_V}, streaming=True))
    return specs


AOT_SPECS = _aot_specs()
