"""Masked log-prob + SLIM-RL loss benchmark: time and peak memory of fwd+bwd against full logits.

Methods (same run, same machine):
  reference      what RL codebases do: logits = hidden·Wᵀ for every row ([N, V] in the input dtype),
                 log_softmax in fp32 over the whole vocabulary, gather the label; autograd backward
  torch_chunked  slim_ops.masked_logprob(backend="torch"): chunked custom autograd that recomputes
  triton         slim_ops.masked_logprob(backend="triton"): fused kernels (GPU only)
FLOPs: the minimum work of fwd+bwd is 3 GEMMs = 6·N·V·d (logits, dhidden, dweight); the recomputing
methods do 8·N·V·d. TFLOP/s below always divide 6·N·V·d by the time (useful FLOP/s).
logprob_from_logits (GPU): bytes = N·V·2 (fwd: one read of bf16 logits), 3·N·V·2 (fwd+bwd: two reads, one
write); GB/s = bytes / time.  policy loss: B·L fp32 inputs, tiny; reported as latency.

Peak memory: CPU = peak RSS of a fresh process above its RSS once the inputs exist and the method ran once
on tiny inputs (imports, allocator set-up), one child process per method; GPU = torch.cuda.max_memory_allocated
above the allocation before the call.
Correctness gate: every method's log-probs are checked against the fp32 reference on a row slice first.

  python benchmarks/bench_logprob.py --device cpu  --out benchmarks/results   (N=4096, d=256, V=151936 fp32)
  python benchmarks/bench_logprob.py --device cuda --out $OUT                 (N∈{4096,16384}, d=2560, bf16)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import slim_ops  # noqa: E402
from benchmarks.common import add_load_flag, machine_load, metadata, time_fn, write_result  # noqa: E402
from slim_ops.ops.masked_logprob.reference import masked_logprob_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_logprob(hidden, weight, labels):
    logits = hidden @ weight.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None])[:, 0]


def method_fn(name: str):
    if name == "reference":
        return reference_logprob
    backend = {"torch_chunked": "torch", "triton": "triton"}[name]
    return lambda h, w, y: slim_ops.masked_logprob(h, w, y, backend=backend)


def make_inputs(N: int, d: int, V: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = (torch.randn(N, d, generator=g, device=device, dtype=dtype) * 0.5).requires_grad_()
    w = (torch.randn(V, d, generator=g, device=device, dtype=dtype) * 0.05).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g, device=device)
    up = torch.randn(N, generator=g, device=device)
    return h, w, y, up


def fwd_bwd(fn, h, w, y, up):
    logp = fn(h, w, y)
    return torch.autograd.grad(logp, (h, w), grad_outputs=up)


def gate(names, h, w, y, rows: int = 256) -> None:
    """Log-probs of every method on the first rows against the fp32 reference (input dtype tolerance)."""
    from slim_ops.testing import assert_close

    hs = h.detach()[:rows]
    ref, _ = masked_logprob_ref(hs, w.detach(), y[:rows])
    for name in names:
        with torch.no_grad():
            got = method_fn(name)(hs, w.detach(), y[:rows])
        assert_close(got, ref, dtype=h.dtype if name != "reference" else torch.bfloat16, name=f"gate {name}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args) -> None:
    """Runs in a fresh process: peak RSS of fwd+bwd above the RSS with the inputs allocated."""
    fn = method_fn(args.memory_child)
    # warm-up on tiny inputs first: module imports and allocator set-up are not the op's memory
    fwd_bwd(fn, *make_inputs(4, args.d, 512, DTYPES[args.dtype], "cpu"))
    h, w, y, up = make_inputs(args.N, args.d, args.V, DTYPES[args.dtype], "cpu")
    base = _rss_bytes()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        grads = fwd_bwd(fn, h, w, y, up)
        times.append((time.perf_counter() - t0) * 1e3)
        del grads
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": args.memory_child, "base_rss_bytes": base, "peak_rss_bytes": peak,
                      "peak_extra_bytes": peak - base, "times_ms": times}))


def cpu_memory(args) -> list[dict]:
    rows = []
    for name in ("torch_chunked", "reference"):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--N", str(args.N), "--d",
               str(args.d), "--V", str(args.V), "--dtype", args.dtype, "--reps", str(args.reps)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"memory child {name} failed:\n{p.stderr[-3000:]}")
        rec = json.loads(p.stdout.strip().splitlines()[-1])
        rec.update(N=args.N, d=args.d, V=args.V, dtype=args.dtype)
        rows.append(rec)
        print(f"  {name:<14} peak extra {rec['peak_extra_bytes'] / 2**20:9.1f} MiB  times(ms) "
              f"{[round(t) for t in rec['times_ms']]}")
    ours, ref = rows
    ratio = ours["peak_extra_bytes"] / ref["peak_extra_bytes"]
    print(f"  torch_chunked / reference peak memory = {100 * ratio:.2f}% (acceptance: < 10%)")
    return rows + [{"method": "ratio", "torch_chunked_over_reference": ratio}]


def timing(names, N, d, V, dtype, device, reps, warmup) -> list[dict]:
    h, w, y, up = make_inputs(N, d, V, dtype, device)
    gate(names, h, w, y)
    out = []
    for name in names:
        fn = method_fn(name)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t = time_fn(lambda fn=fn: fwd_bwd(fn, h, w, y, up), device, warmup=warmup, reps=reps)
        rec = {"op": "masked_logprob fwd+bwd", "method": name, "N": N, "d": d, "V": V, "dtype": str(dtype),
               **t,
               "useful_tflops": 6 * N * V * d / (t["median_ms"] * 1e-3) / 1e12,
               "flops_formula": "6*N*V*d (3 GEMMs)"}
        if device == "cuda":
            rec["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        out.append(rec)
        mem = f" peak+{rec['peak_extra_mib']:8.0f} MiB" if device == "cuda" else ""
        print(f"  {name:<14} N={N:<6} {t['median_ms']:9.2f} ms (p20 {t['p20_ms']:.2f}, p80 {t['p80_ms']:.2f})"
              f" {rec['useful_tflops']:7.2f} TFLOP/s{mem}")
    return out


def logits_section(device: str, N: int, V: int) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(1)
    logits = (torch.randn(N, V, generator=g, device=device) * 3).bfloat16().requires_grad_()
    y = torch.randint(0, V, (N,), generator=g, device=device)
    up = torch.randn(N, device=device)
    ref = torch.log_softmax(logits.detach().float(), -1).gather(1, y[:, None])[:, 0]
    out = []
    methods = {"torch_log_softmax": lambda z: torch.log_softmax(z.float(), -1).gather(1, y[:, None])[:, 0]}
    for be in slim_ops.available_backends(device, "logprob_from_logits"):
        methods[be] = lambda z, be=be: slim_ops.logprob_from_logits(z, y, backend=be)
    for name, fn in methods.items():
        with torch.no_grad():
            err = (fn(logits.detach()) - ref).abs().max().item()
        assert err < 1e-3, f"gate logprob_from_logits {name}: max err {err}"
        for mode, nbytes in (("fwd", N * V * 2), ("fwd+bwd", 3 * N * V * 2)):
            if mode == "fwd":
                f = lambda fn=fn: fn(logits.detach())
            else:
                f = lambda fn=fn: torch.autograd.grad(fn(logits), logits, grad_outputs=up)
            t = time_fn(f, device, warmup=3, reps=20)
            gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
            out.append({"op": f"logprob_from_logits {mode}", "method": name, "N": N, "V": V, "dtype": "bf16",
                        **t,
                        "gb_per_s": gbs, "bytes_formula": "N*V*2" if mode == "fwd" else "3*N*V*2"})
            print(f"  logits {mode:<8} {name:<18} {t['median_ms']:8.3f} ms {gbs:8.1f} GB/s")
    return out


def policy_section(device: str, B: int, L: int) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(2)
    old = -torch.rand(B, L, generator=g, device=device) * 4
    logp = (old + 0.1 * torch.randn(B, L, generator=g, device=device)).requires_grad_()
    mask = torch.rand(B, L, generator=g, device=device) < 0.5
    adv = torch.randn(B, generator=g, device=device)
    out = []
    backends = ["torch"] + (["triton"] if device == "cuda" else [])
    ref = None
    for be in backends:
        def f(be=be):
            loss, _ = slim_ops.slim_policy_loss(logp, old, mask, adv, backend=be)
            return torch.autograd.grad(loss, logp)
        val = f()[0]
        ref = val if ref is None else ref
        assert (val - ref).abs().max().item() < 1e-6, f"gate policy loss {be}"
        t = time_fn(f, device, warmup=3, reps=30)
        out.append({"op": "slim_policy_loss fwd+bwd", "method": be, "B": B, "L": L, **t})
        print(f"  policy loss B={B} L={L} {be:<7} {t['median_ms']:8.3f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--dtype", default=None, choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--memory-child", default=None)
    ap.add_argument("--skip-memory", action="store_true")
    add_load_flag(ap)
    args = ap.parse_args()
    if args.memory_child is None:
        load_before = machine_load()
    if args.memory_child:
        args.d = args.d or 256
        args.dtype = args.dtype or "fp32"
        memory_child(args)
        return
    meta = metadata(args.device)
    results: list[dict] = []
    if args.device == "cpu":
        args.d = args.d or 256
        args.dtype = args.dtype or "fp32"
        print(f"CPU: masked_logprob fwd+bwd, N={args.N} d={args.d} V={args.V} {args.dtype}, fresh processes")
        if not args.skip_memory:
            results += cpu_memory(args)
        results += timing(["torch_chunked", "reference"], 256, args.d, args.V, DTYPES[args.dtype], "cpu",
                          reps=3, warmup=1)
        results += policy_section("cpu", 64, 256)
    else:
        d = args.d or 2560
        dtype = DTYPES[args.dtype or "bf16"]
        for N in (4096, 16384):
            results += timing(["triton", "torch_chunked", "reference"], N, d, args.V, dtype, "cuda",
                              reps=5 if N > 4096 else 10, warmup=2)
        results += logits_section("cuda", 1024, args.V)
        results += policy_section("cuda", 256, 256)
    path = write_result(args.out, "bench_logprob", {"meta": meta, "results": results}, load_before=load_before,
                        allow_loaded=args.allow_loaded)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
