"""Block-diffusion attention benchmark (the training layout of docs/attention.md).

CPU (label CPU): the reference path vs what the reference trainer does —
  mask_loops     build the dense [B, 1, N, N] mask with Python loops over blocks + pad fix-up, then the
                 additive mask (what every training step pays before the model runs)
  mask_layout    BlockLayout.dense_mask() (vectorised, same mask; checked equal first)
  sdpa_additive  SDPA with the additive fp32 mask, fwd and fwd+bwd
  torch_backend  slim_ops' torch backend (fp32 SDPA per query chunk, chunked analytic backward)
GPU (bf16, Hq=32, Hkv=8, D=128 at (L0, L1, K) = (300, 256, 16), (1024, 1024, 16), (512, 2048, 4)):
  sdpa_dense     SDPA with the dense boolean mask (K/V repeated to Hq heads, as HF does with a mask)
  flex           torch.compile(flex_attention) with a BlockMask built once from layout.mask_mod
  triton         slim_ops' Triton kernels (no mask tensor, fully masked tiles skipped)
forward and forward+backward; peak memory of each.

Decode layout (BlockLayout.decode: Lq = K = 16 new slots over a KV cache of ragged length — left pads of a
different length per row —, the rollout hot path; forward only, as in generation):
  GPU (bf16, R=256 rows × cache 572 and R=4 × cache 4096 (split-KV), Hq=32, Hkv=8, D=128):
    sdpa_dense      SDPA with the dense boolean mask, K/V repeated to Hq heads (what HF does with a mask)
    sdpa_gqa        SDPA with enable_gqa and the key-padding mask broadcast over rows (no repeat)
    triton_general  slim_ops' training forward kernel (one query head per program, 128-row tiles)
    triton_decode   slim_ops' decode kernel (the G·Lq rows of a KV head packed into one tile, split-KV)
  CPU (fp32, R=4 × cache 140, Hq=8, Hkv=2, D=64; label CPU): sdpa_dense, sdpa_gqa and the torch backend.
  ``--interpret`` adds the Triton paths through the interpreter (a functional check, not a speed figure).

FLOPs are counted on allowed pairs only: P = Σ_b allowed(q, k) pairs (BlockLayout.allowed_pairs()),
  forward FLOPs      = 4 · D · Hq · P              (Q·Kᵀ and P·V, 2 FLOPs per multiply-add)
  fwd+bwd FLOPs      = 4 · D · Hq · P · 3.5        (backward: 5 matmuls = 2.5 × forward)
TFLOP/s = FLOPs / median time. % of peak uses 989 TFLOP/s (H100/H200 SXM dense bf16 spec sheet).
A correctness gate runs first: each candidate's output vs SDPA with the dense mask (fp32 reference on the
CPU; bf16 outputs within 3e-2 of the fp32 result on the GPU).

  python benchmarks/bench_attention.py --device cpu  --out benchmarks/results
  python benchmarks/bench_attention.py --device cuda --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
if "--interpret" in sys.argv:  # before slim_ops imports triton kernels (read at decoration time)
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.common import metadata, peak_memory_mb, peak_memory_reset, time_fn, write_json  # noqa: E402
from slim_ops import BlockLayout, block_diffusion_attention  # noqa: E402

PEAK_BF16_TFLOPS = 989.0


def mask_with_loops(L0: int, L1: int, K: int, pad: torch.Tensor) -> torch.Tensor:
    """The reference trainer's way: fill allowed rectangles block by block (Python loops), hide prompt pad
    keys, give empty prompt rows their diagonal. int [B, 1, N, N] (1 = allowed)."""
    B = pad.shape[0]
    N = L0 + 2 * L1
    m = torch.zeros(1, 1, N, N, dtype=torch.int64)
    for bi in range((L1 + K - 1) // K):
        i0, i1 = bi * K, min((bi + 1) * K, L1)
        m[:, :, L0 + i0:L0 + i1, 0:L0 + i1] = 1
        m[:, :, L0 + L1 + i0:L0 + L1 + i1, 0:L0 + i0] = 1
        m[:, :, L0 + L1 + i0:L0 + L1 + i1, L0 + L1 + i0:L0 + L1 + i0 + K] = 1
    for bi in range((L0 + K - 1) // K):
        r1, r0 = L0 - bi * K, max(L0 - (bi + 1) * K, 0)
        m[:, :, r0:r1, 0:r1] = 1
    m = m.repeat_interleave(B, dim=0)
    key_pad = torch.zeros(B, N, dtype=torch.bool)
    key_pad[:, :L0] = pad
    m.masked_fill_(key_pad[:, None, None, :], 0)
    rows = torch.arange(N)
    empty = (m[:, 0].sum(-1) == 0) & (rows[None, :] < L0)
    for b, r in zip(*empty.nonzero(as_tuple=True)):
        m[b, 0, r, r] = 1
    return m


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(mask == 0, torch.finfo(dtype).min)


def _left_pad(B: int, L0: int, gen: torch.Generator) -> torch.Tensor:
    n = torch.randint(0, max(1, L0 // 3), (B,), generator=gen)
    return torch.arange(L0)[None, :] < n[:, None]


def _fwd_only(fn, q, k, v):
    def run():
        with torch.no_grad():  # inference forward: no autograd graph, nothing saved for a backward
            return fn(q, k, v)

    return run


def _fwd_bwd(fn, q, k, v, do):
    def run():
        o = fn(q, k, v)
        torch.autograd.grad(o, (q, k, v), do)

    return run


def _record(name: str, t: dict, flops: float | None, device: str, extra: dict | None = None) -> dict:
    rec = {"name": name, **t}
    if flops is not None:
        rec["tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
        if device == "cuda":
            rec["pct_of_peak_bf16"] = 100 * rec["tflops"] / PEAK_BF16_TFLOPS
    rec.update(extra or {})
    return rec


def bench_cpu(args) -> dict:
    dev = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    results = []
    if args.layouts in ("all", "train"):
        B, Hq, Hkv, D = args.B or 1, args.Hq or 8, args.Hkv or 2, args.D or 64
        results += [_bench_cpu_shape(args, gen, B, Hq, Hkv, D, L0, L1, K) for L0, L1, K in [(300, 256, 16)]]
    if args.layouts in ("all", "decode"):
        R, Hq, Hkv, D = args.B or 4, args.Hq or 8, args.Hkv or 2, args.D or 64
        results.append(_bench_decode_shape(args, gen, "cpu", torch.float32, R, Hq, Hkv, D, 140, 16))
    return {"meta": metadata(dev), "bench": "attention", "results": results}


def _ragged_cache_pad(R: int, ell: int, gen: torch.Generator) -> torch.Tensor:
    """Left pads of a different length per row (prompts of different lengths in one rollout batch)."""
    n = torch.randint(0, max(1, ell // 2), (R,), generator=gen)
    return torch.arange(ell)[None, :] < n[:, None]


def _bench_decode_shape(args, gen, dev: str, dtype: torch.dtype, R: int, Hq: int, Hkv: int, D: int, ell: int,
                        K: int) -> dict:
    """One decode step: K new queries of R rows against a cache of ℓ (ragged: left pads) + the K new keys."""
    from slim_ops.ops.attention import triton as T

    G = Hq // Hkv
    pad = _ragged_cache_pad(R, ell, gen).to(dev)
    lay = BlockLayout.decode(ell, K, cache_pad=pad)
    Lk = lay.num_keys
    mask = lay.dense_mask()[:, None]  # [R, 1, K, Lk]
    key_ok = ~lay.key_padding()[:, None, None, :]  # [R, 1, 1, Lk]: decode = every pair but the pad keys
    q = torch.randn(R, Hq, K, D, generator=gen).to(dev, dtype)
    k = torch.randn(R, Hkv, Lk, D, generator=gen).to(dev, dtype)
    v = torch.randn(R, Hkv, Lk, D, generator=gen).to(dev, dtype)
    scale = 1.0 / D**0.5
    u8, fv = pad.to(torch.uint8), lay.first_valid()

    def sdpa_dense(a, b, c):
        return F.scaled_dot_product_attention(a, b.repeat_interleave(G, 1), c.repeat_interleave(G, 1),
                                              attn_mask=mask)

    def sdpa_gqa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, attn_mask=key_ok, enable_gqa=True)

    def triton_path(path):
        def run(a, b, c):
            return T.bda_fwd(a, b, c, u8, fv, lay.prompt_len, lay.response_len, K, lay.q_start, scale, path=path)[0]
        return run

    cands = [("sdpa_dense", sdpa_dense), ("sdpa_gqa", sdpa_gqa)]
    if dev == "cpu":
        cands.append(("torch_backend", lambda a, b, c: block_diffusion_attention(a, b, c, lay, backend="torch")))
    if dev == "cuda" or args.interpret:
        cands += [("triton_general", triton_path("general")), ("triton_decode", triton_path("decode"))]
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(G, 1),
                                             v.float().repeat_interleave(G, 1), attn_mask=mask)
        errs = {name: (fn(q, k, v).float() - ref).abs().max().item() for name, fn in cands}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"decode correctness gate failed (max|diff| vs fp32): {bad}"
    P = int(lay.allowed_pairs().sum())
    fl = 4 * D * Hq * P
    reps = args.reps or (20 if dev == "cuda" else 30)
    runs = []
    for name, fn in cands:
        call = _fwd_only(fn, q, k, v)
        slow = name.startswith("triton") and dev == "cpu"  # the interpreter: one timed run is plenty
        runs.append(_record(f"{name}_fwd", time_fn(call, dev, warmup=1, reps=1 if slow else reps), fl, dev,
                            {"flops_formula": "4*D*Hq*allowed_pairs", "interpreter": slow}))
    by = {r["name"]: r["median_ms"] for r in runs}
    speedups = {}
    if "triton_decode_fwd" in by and dev == "cuda":
        speedups = {f"triton_decode_vs_{b}": by[f"{b}_fwd"] / by["triton_decode_fwd"]
                    for b in ("sdpa_dense", "sdpa_gqa", "triton_general")}
    shape = {"layout": "decode", "R": R, "B": R, "Hq": Hq, "Hkv": Hkv, "D": D, "L0": ell, "L1": K, "K": K,
             "N": Lk, "cache_len": ell, "allowed_pairs": P, "dense_pairs": R * K * Lk,
             "dtype": str(dtype).removeprefix("torch.")}
    out = {"shape": shape, "max_abs_diff_vs_fp32": errs, "runs": runs}
    if speedups:
        out["speedups"] = speedups
    return out


def _bench_cpu_shape(args, gen, B, Hq, Hkv, D, L0, L1, K) -> dict:
    dev = "cpu"
    pad = _left_pad(B, L0, gen)
    lay = BlockLayout.train(L0, L1, K, prompt_pad=pad)
    N = lay.seq_len
    P = int(lay.allowed_pairs().sum()) if lay.batch_size == B else int(lay.allowed_pairs()) * B
    mask_loop = mask_with_loops(L0, L1, K, pad)
    assert torch.equal(mask_loop[:, 0].bool(), lay.dense_mask()), "mask gate failed"
    q = torch.randn(B, Hq, N, D, generator=gen, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, generator=gen, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, generator=gen, requires_grad=True)
    do = torch.randn(B, Hq, N, D, generator=gen)
    G = Hq // Hkv

    def sdpa_additive(a, b, c):
        add = _additive(mask_loop, a.dtype)
        return F.scaled_dot_product_attention(a, b.repeat_interleave(G, 1), c.repeat_interleave(G, 1),
                                              attn_mask=add)

    def ours(a, b, c):
        return block_diffusion_attention(a, b, c, lay, backend="torch")

    with torch.no_grad():
        ref = sdpa_additive(q, k, v)
        err = (ours(q, k, v) - ref).abs().max().item()
    # (the CPU forward rows are timed with autograd recording, as in training)
    assert err < 1e-4, f"correctness gate: torch backend vs SDPA+additive mask max|diff| = {err}"
    fl_f = 4 * D * Hq * P
    shape = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "L0": L0, "L1": L1, "K": K, "N": N,
             "allowed_pairs": P, "dense_pairs": B * N * N, "dtype": "fp32"}
    reps = args.reps or 5
    return {"shape": shape, "max_abs_diff_vs_sdpa": err, "runs": [
        _record("mask_loops", time_fn(lambda: _additive(mask_with_loops(L0, L1, K, pad), torch.float32),
                                      dev, warmup=1, reps=reps), None, dev),
        _record("mask_layout", time_fn(lambda: lay.dense_mask(), dev, warmup=1, reps=reps), None, dev),
        _record("sdpa_additive_fwd", time_fn(lambda: sdpa_additive(q, k, v), dev, warmup=1, reps=reps),
                fl_f, dev, {"flops_formula": "4*D*Hq*allowed_pairs"}),
        _record("torch_backend_fwd", time_fn(lambda: ours(q, k, v), dev, warmup=1, reps=reps), fl_f, dev,
                {"flops_formula": "4*D*Hq*allowed_pairs"}),
        _record("sdpa_additive_fwd_bwd", time_fn(_fwd_bwd(sdpa_additive, q, k, v, do), dev, warmup=1,
                                                 reps=reps), 3.5 * fl_f, dev,
                {"flops_formula": "3.5*4*D*Hq*allowed_pairs"}),
        _record("torch_backend_fwd_bwd", time_fn(_fwd_bwd(ours, q, k, v, do), dev, warmup=1, reps=reps),
                3.5 * fl_f, dev, {"flops_formula": "3.5*4*D*Hq*allowed_pairs"}),
    ]}


def bench_cuda(args) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    Hq, Hkv, D = args.Hq or 32, args.Hkv or 8, args.D or 128
    flex = torch.compile(flex_attention, dynamic=False)
    shapes = [((300, 256, 16), args.B or 4), ((1024, 1024, 16), args.B or 1), ((512, 2048, 4), args.B or 1)]
    if args.shapes:
        shapes = [(tuple(int(x) for x in sh.split(",")), args.B or 1) for sh in args.shapes.split(";")]
    payload = {"meta": metadata(dev), "bench": "attention", "results": []}
    partial = os.path.join(args.out, "attention_cuda_inprogress.json")
    os.makedirs(args.out, exist_ok=True)
    jobs = []
    if args.layouts in ("all", "decode"):
        jobs += [lambda R=R, ell=ell: _bench_decode_shape(args, gen, dev, torch.bfloat16, R, Hq, Hkv, D, ell, 16)
                 for R, ell in ((256, 572), (4, 4096))]
    if args.layouts in ("all", "train"):
        jobs += [lambda L0=L0, L1=L1, K=K, B=B: _bench_cuda_shape(args, gen, flex, B, Hq, Hkv, D, L0, L1, K)
                 for (L0, L1, K), B in shapes]
    for job in jobs:
        payload["results"].append(job())
        _print_result(payload["meta"]["device"], payload["results"][-1])
        with open(partial, "w") as f:  # survives a timeout of the whole run
            json.dump(payload, f, indent=1)
    os.remove(partial)
    return payload


def _print_result(device: str, res: dict) -> None:
    s = res["shape"]
    if s.get("layout") == "decode":
        print(f"{device} decode R={s['R']} cache={s['cache_len']} K={s['K']} Hq={s['Hq']} Hkv={s['Hkv']} D={s['D']} "
              f"{s['dtype']} allowed={s['allowed_pairs']}/{s['dense_pairs']}")
    else:
        print(f"{device} L0={s['L0']} L1={s['L1']} K={s['K']} B={s['B']} N={s['N']} "
              f"allowed={s['allowed_pairs']}/{s['dense_pairs']}")
    for r in res["runs"]:
        extra = f"  {r['tflops']:.3f} TFLOP/s" if "tflops" in r else ""
        mem = f"  peak+{r['peak_extra_mb']:.0f} MB" if r.get("peak_extra_mb") is not None else ""
        print(f"  {r['name']:<24} {r['median_ms']:9.3f} ms (p20 {r['p20_ms']:.3f}, "
              f"p80 {r['p80_ms']:.3f}){extra}{mem}")
    if "speedups" in res:
        print("  speedups: " + ", ".join(f"{k}={v:.2f}x" for k, v in res["speedups"].items()))


def _bench_cuda_shape(args, gen, flex, B, Hq, Hkv, D, L0, L1, K) -> dict:
    dev = "cuda"
    G = Hq // Hkv
    pad = _left_pad(B, L0, gen).to(dev)
    lay = BlockLayout.train(L0, L1, K, prompt_pad=pad)
    N = lay.seq_len
    P = int(lay.allowed_pairs().sum())
    mask = lay.dense_mask()[:, None]  # [B, 1, N, N] bool
    block_mask = lay.flex_block_mask(B, None, dev)
    q = torch.randn(B, Hq, N, D, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
    do = torch.randn(B, Hq, N, D, generator=gen).to(dev, torch.bfloat16)

    def sdpa_dense(a, b, c):
        return F.scaled_dot_product_attention(a, b.repeat_interleave(G, 1), c.repeat_interleave(G, 1),
                                              attn_mask=mask)

    def flex_fn(a, b, c):
        return flex(a, b, c, block_mask=block_mask, enable_gqa=True)

    def ours(a, b, c):
        return block_diffusion_attention(a, b, c, lay, backend="triton")

    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(G, 1),
                                             v.float().repeat_interleave(G, 1), attn_mask=mask)
        errs = {name: (fn(q, k, v).float() - ref).abs().max().item()
                for name, fn in (("sdpa_dense", sdpa_dense), ("flex", flex_fn), ("triton", ours))}
    bad = {n: e for n, e in errs.items() if not e < 3e-2}
    assert not bad, f"correctness gate failed (max|diff| vs fp32): {bad}"
    fl_f = 4 * D * Hq * P
    shape = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "L0": L0, "L1": L1, "K": K, "N": N, "allowed_pairs": P,
             "dense_pairs": B * N * N, "dtype": "bf16"}
    runs = []
    reps = args.reps or 20
    for name, fn in (("sdpa_dense", sdpa_dense), ("flex", flex_fn), ("triton", ours)):
        for mode in ("fwd", "fwd_bwd"):
            call = _fwd_only(fn, q, k, v) if mode == "fwd" else _fwd_bwd(fn, q, k, v, do)
            call()  # compile / autotune outside the timed region
            torch.cuda.synchronize()
            peak_memory_reset(dev)
            base = torch.cuda.memory_allocated() / 2**20
            call()
            torch.cuda.synchronize()
            peak = peak_memory_mb(dev) - base
            t = time_fn(call, dev, warmup=2, reps=reps)
            fl = fl_f if mode == "fwd" else 3.5 * fl_f
            runs.append(_record(f"{name}_{mode}", t, fl, dev, {
                "peak_extra_mb": peak, "flops_formula": ("4" if mode == "fwd" else "3.5*4") +
                "*D*Hq*allowed_pairs"}))
    by = {r["name"]: r["median_ms"] for r in runs}
    speedups = {f"triton_vs_{b}_{m}": by[f"{b}_{m}"] / by[f"triton_{m}"]
                for b in ("sdpa_dense", "flex") for m in ("fwd", "fwd_bwd")}
    return {"shape": shape, "max_abs_diff_vs_fp32": errs, "runs": runs, "speedups": speedups}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--B", type=int, default=None)
    ap.add_argument("--Hq", type=int, default=None)
    ap.add_argument("--Hkv", type=int, default=None)
    ap.add_argument("--D", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (1 = stable timings on a shared machine; 0 = torch default)")
    ap.add_argument("--shapes", default=None, help='GPU shapes "L0,L1,K;L0,L1,K" (default: the three of issue 3)')
    ap.add_argument("--layouts", default="all", choices=("all", "train", "decode"))
    ap.add_argument("--interpret", action="store_true",
                    help="CPU: also run the Triton paths through the interpreter (functional check, not speed)")
    args = ap.parse_args()
    payload = bench_cuda(args) if args.device == "cuda" else bench_cpu(args)
    path = write_json(args.out, "attention", payload)
    if args.device != "cuda":
        for res in payload["results"]:
            _print_result(payload["meta"]["device"], res)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
