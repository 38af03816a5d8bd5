"""Decode step benchmark: slim_ops.tau_budget_step backends vs the reference's per-row loop.

Baselines, measured in the same run on the same machine:
  per_row_loop  what the reference engines do per sequence: fp64 softmax over V, max, sort + cumsum of the
                above-τ confidences, `.item()` host syncs, a Python loop over rows (SPEC §7)
  torch         slim_ops' vectorised PyTorch backend (what a CPU user gets)
  compiled      torch.compile of the same vectorised backend (GPU only)
  triton, cuda  the fused kernels (GPU only)
Floor: one read of the logits.  GB/s = R·K·V·bytes(dtype) / time  (the outputs are O(R·K), negligible);
on the GPU it is compared with the measured device copy bandwidth (clone: 2 × bytes moved / time).

Correctness gate: every backend's greedy tokens / commit sets must equal the torch backend's before timing.

  python benchmarks/bench_tau_budget.py --device cpu  --out benchmarks/results   (R=64, K=16, V=151936 fp32)
  python benchmarks/bench_tau_budget.py --device cuda --out $OUT                 (R=256, K=16, V=151936 bf16)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import slim_ops  # noqa: E402
from benchmarks.common import metadata, time_fn, write_json  # noqa: E402
from slim_ops.ops.tau_budget.reference import per_row_loop  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--R", type=int, default=None)
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    dev = args.device
    gpu = dev == "cuda"
    R = args.R or (256 if gpu else 64)
    K, V = args.K, args.V
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = args.reps or (50 if gpu else 7)
    mask_id = 151669 if V > 151669 else V - 1
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(R, K, V, generator=g) * 3).to(dtype).to(dev)
    logits[:, :, :8] += 12.0  # some confident slots so the budget matters
    block = torch.full((R, K), mask_id, dtype=torch.int64)
    block[:, : K // 4] = 5  # a quarter already committed
    block = block.to(dev)
    nbytes = R * K * V * logits.element_size()

    ref = slim_ops.tau_budget_step(logits, block, mask_id, backend="torch")
    candidates = {"torch": lambda: slim_ops.tau_budget_step(logits, block, mask_id, backend="torch")}
    if gpu:
        from slim_ops.ops.tau_budget.op import _params
        from slim_ops.ops.tau_budget.torch_impl import tau_budget_step_torch

        tau32, bud, fl = _params("bench", R, logits.device, 0.9, 1.0, 1)
        seed = torch.zeros(1, dtype=torch.int64, device=dev)
        compiled = torch.compile(tau_budget_step_torch, dynamic=False)
        candidates["compiled"] = lambda: compiled(logits, block, mask_id, tau32, bud, fl, seed, 0.0, 0)
        for b in ("triton", "cuda"):
            if b in slim_ops.available_backends(dev):
                candidates[b] = (lambda b=b: slim_ops.tau_budget_step(logits, block, mask_id, backend=b))
    candidates["per_row_loop"] = lambda: per_row_loop(logits, block, mask_id)

    # correctness gate
    for name, fn in candidates.items():
        out = fn()
        blk = out if isinstance(out, torch.Tensor) else out[0]
        if not torch.equal(blk, ref.block):
            raise SystemExit(f"correctness gate failed: {name} commits differ from the torch backend")

    results = {}
    for name, fn in candidates.items():
        r = time_fn(fn, dev, warmup=2 if not gpu else 5, reps=reps)
        r["GB_per_s"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
        results[name] = r
    payload = {"bench": "tau_budget_step", "meta": metadata(dev),
               "shape": {"R": R, "K": K, "V": V, "dtype": str(dtype).replace("torch.", ""), "strategy": "tau_budget",
                         "temperature": 0.0},
               "bytes_read": nbytes, "bytes_formula": "R*K*V*sizeof(dtype)", "results": results}
    if gpu:
        copy = time_fn(lambda: logits.clone(), dev, warmup=5, reps=reps)
        copy_bw = 2 * nbytes / (copy["median_ms"] * 1e-3) / 1e9
        payload["copy_GB_per_s"] = copy_bw
        payload["floor_ms"] = nbytes / (copy_bw * 1e9) * 1e3
        for r in results.values():
            r["pct_of_copy_bw"] = 100 * r["GB_per_s"] / copy_bw
    base = results["per_row_loop"]["median_ms"]
    for r in results.values():
        r["speedup_vs_per_row_loop"] = base / r["median_ms"]
    path = write_json(args.out, "tau_budget", payload)
    label = "GPU " + str(payload["meta"]["gpu"]) if gpu else "CPU"
    print(f"tau_budget_step  R={R} K={K} V={V} {payload['shape']['dtype']}  ({label}; {path})")
    print(f"{'backend':<14}{'median ms':>11}{'p20':>9}{'p80':>9}{'GB/s':>9}{'x loop':>9}")
    for name, r in results.items():
        print(f"{name:<14}{r['median_ms']:>11.3f}{r['p20_ms']:>9.3f}{r['p80_ms']:>9.3f}{r['GB_per_s']:>9.1f}"
              f"{r['speedup_vs_per_row_loop']:>9.1f}")


if __name__ == "__main__":
    main()
