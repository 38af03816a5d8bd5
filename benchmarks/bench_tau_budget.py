"""Decode step benchmark: slim_ops.tau_budget_step (auto-selected backend) against its baselines.

Measured in the same process, on the same logits tensor, candidates timed round-robin (one call of each per
round, so that load from other processes hits every candidate alike); medians of the rounds:
  auto            slim_ops.tau_budget_step(backend=None): what a user gets (cpp on the CPU, cuda on a GPU)
  torch           slim_ops' vectorised PyTorch backend (chunked, torch_impl.py)
  vectorised      a plain vectorised PyTorch version of the same rule (greedy, tau_budget): max + argmax,
                  logsumexp, stable sort, cumsum, scatter; no Python loop, no host sync
  compiled        torch.compile of `vectorised` (inductor, dynamic=False), the strongest peer on the CPU
  per_row_loop    what the reference engines do per sequence: fp64 softmax over V, sort + cumsum of the
                  above-τ confidences, `.item()` host syncs, a Python loop over rows (docs/benchmarks.md)
  triton, cuda    the fused kernels (GPU only)
Floor: one read of the same logits tensor: `logits.sum()` and `logits.amax(-1)` (a max reduction per slot),
both multi-threaded torch reductions; the faster of the two is the floor.
GB/s = R·K·V·bytes(dtype) / time (the outputs are O(R·K), negligible).
A second table times T = 1 sampling (auto vs torch backend; the other baselines are greedy only).

Correctness gate: every greedy candidate's new block must equal reference.tau_budget_step_ref's on the first
rows before anything is timed; the auto backend is checked on every row against the torch backend too.

  python benchmarks/bench_tau_budget.py --device cpu    (R=64, K=16, V=151936 fp32; writes benchmarks/results/cpu)
  python benchmarks/bench_tau_budget.py --device cuda   (R=256, K=16, V=151936 bf16)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import slim_ops  # noqa: E402
from benchmarks.common import add_load_flag, machine_load, metadata, sync, write_result  # noqa: E402
from slim_ops import _backend  # noqa: E402
from slim_ops.ops.tau_budget.op import _params  # noqa: E402
from slim_ops.ops.tau_budget.reference import per_row_loop, tau_budget_step_ref  # noqa: E402


def step_vectorised(logits: torch.Tensor, block: torch.Tensor, mask_id: int, tau32: torch.Tensor, bud: torch.Tensor,
                    floor: torch.Tensor) -> torch.Tensor:
    """Greedy tau_budget step in plain vectorised PyTorch (the rule of reference.py): returns the new block."""
    z = logits.float()
    mx, tok = z.max(dim=-1)  # first index among equal maxima; NaN / +inf / all -inf make mx non-finite
    conf = torch.exp(mx - torch.logsumexp(z, dim=-1))  # softmax(z)[argmax] = 1 / Σexp(z − max)
    valid = torch.isfinite(mx)
    eligible = (block == mask_id) & valid
    key = torch.where(eligible, conf, float("-inf"))
    sorted_c, perm = torch.sort(key, dim=-1, descending=True, stable=True)
    sorted_el = eligible.gather(1, perm)
    above = sorted_el & (sorted_c > tau32[:, None])
    used = torch.cumsum(torch.where(above, 1.0 - sorted_c, 0.0), dim=-1)
    k_b = (above & (used <= bud[:, None])).sum(dim=-1)
    k = torch.minimum(torch.maximum(k_b, floor.to(k_b.dtype)), sorted_el.sum(dim=-1))
    commit_sorted = torch.arange(block.shape[1], device=block.device)[None, :] < k[:, None]
    commit = torch.zeros_like(commit_sorted).scatter(1, perm, commit_sorted)
    return torch.where(commit, torch.where(valid, tok, mask_id), block)


def time_round_robin(cands: dict[str, object], device: str, reps: int, warmup: int = 1,
                     reps_for: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
    """Wall time (ms) of each candidate, one call of each per round; median / p20 / p80 over the rounds."""
    reps_for = reps_for or {}
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cands}
    for i in range(reps):
        for name, fn in cands.items():
            if i >= reps_for.get(name, reps):
                continue
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) >= 2 else [ts[0]] * 9
        out[name] = {"median_ms": statistics.median(ts), "p20_ms": q[1], "p80_ms": q[7], "runs": len(ts)}
    return out


def print_table(title: str, results: dict[str, dict[str, float]], floor_ms: float) -> None:
    print(title)
    print(f"{'candidate':<16}{'median ms':>11}{'p20':>10}{'p80':>10}{'GB/s':>8}{'x floor':>9}{'auto is':>10}")
    auto = results["auto"]["median_ms"]
    for name, r in results.items():
        print(f"{name:<16}{r['median_ms']:>11.2f}{r['p20_ms']:>10.2f}{r['p80_ms']:>10.2f}{r['GB_per_s']:>8.1f}"
              f"{r['median_ms'] / floor_ms:>9.2f}{r['median_ms'] / auto:>9.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    ap.add_argument("--R", type=int, default=None)
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    add_load_flag(ap)
    args = ap.parse_args()
    load_before = machine_load()
    dev = args.device
    gpu = dev == "cuda"
    out_dir = args.out or os.path.join("benchmarks", "results", dev)
    R = args.R or (256 if gpu else 64)
    K, V = args.K, args.V
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = args.reps or (50 if gpu else 15)
    mask_id = 151669 if V > 151669 else V - 1
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(R, K, V, generator=g) * 3).to(dtype).to(dev)
    logits[:, :, :8] += 12.0  # some confident slots so the budget matters
    block = torch.full((R, K), mask_id, dtype=torch.int64)
    block[:, : K // 4] = 5  # a quarter already committed
    block = block.to(dev)
    nbytes = R * K * V * logits.element_size()
    tau32, bud, fl = _params("bench", R, logits.device, 0.9, 1.0, 1)
    auto_name = _backend.pick("tau_budget_step", logits.device)

    cands: dict[str, object] = {
        "auto": lambda: slim_ops.tau_budget_step(logits, block, mask_id),
        "torch": lambda: slim_ops.tau_budget_step(logits, block, mask_id, backend="torch"),
        "vectorised": lambda: step_vectorised(logits, block, mask_id, tau32, bud, fl),
    }
    if not args.no_compile:
        compiled = torch.compile(step_vectorised, dynamic=False)
        cands["compiled"] = lambda: compiled(logits, block, mask_id, tau32, bud, fl)
    if gpu:
        for b in ("triton", "cuda"):
            if b in slim_ops.available_backends(dev):
                cands[b] = (lambda b=b: slim_ops.tau_budget_step(logits, block, mask_id, backend=b))
    cands["per_row_loop"] = lambda: per_row_loop(logits, block, mask_id)
    floors = {"read_sum": lambda: logits.sum(), "read_amax": lambda: logits.amax(dim=-1)}

    # correctness gate: the reference on the first rows, the torch backend on all rows
    n_check = min(R, 4)
    ref_block = tau_budget_step_ref(logits[:n_check].cpu(), block[:n_check].cpu(), mask_id)[0]
    full = slim_ops.tau_budget_step(logits, block, mask_id, backend="torch").block
    for name, fn in cands.items():
        out = fn()
        blk = out if isinstance(out, torch.Tensor) else out[0]
        if not torch.equal(blk[:n_check].cpu(), ref_block):
            raise SystemExit(f"correctness gate failed: {name} commits differ from reference.py")
        if not torch.equal(blk, full):
            raise SystemExit(f"correctness gate failed: {name} commits differ from the torch backend")
    if not slim_ops.tau_budget_step(logits, block, mask_id).block.equal(full):
        raise SystemExit("correctness gate failed: auto backend")

    t_start = time.time()
    results = time_round_robin({**floors, **cands}, dev, reps, reps_for={"per_row_loop": min(reps, 5)})
    floor_name = min(floors, key=lambda n: results[n]["median_ms"])
    floor_ms = results[floor_name]["median_ms"]
    for r in results.values():
        r["GB_per_s"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
        r["x_floor"] = r["median_ms"] / floor_ms
    greedy_s = time.time() - t_start

    # T = 1 sampling: auto vs the torch backend, same logits and a fixed generator per call
    samp = {
        "auto": lambda: slim_ops.tau_budget_step(logits, block, mask_id, temperature=1.0,
                                                 generator=torch.Generator(dev).manual_seed(1)),
        "torch": lambda: slim_ops.tau_budget_step(logits, block, mask_id, temperature=1.0, backend="torch",
                                                  generator=torch.Generator(dev).manual_seed(1)),
    }
    a, b = samp["auto"](), samp["torch"]()
    tok_agree = float((a.tokens == b.tokens).float().mean())
    if tok_agree < 0.999:
        raise SystemExit(f"correctness gate failed: sampled tokens agree on {tok_agree:.4%} only")
    samp_res = time_round_robin({floor_name: floors[floor_name], **samp}, dev, max(3, reps // 3))
    for r in samp_res.values():
        r["GB_per_s"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
        r["x_floor"] = r["median_ms"] / samp_res[floor_name]["median_ms"]

    speed = {
        "auto_vs_compiled": (results["compiled"]["median_ms"] / results["auto"]["median_ms"]
                             if "compiled" in results else None),
        "auto_vs_torch": results["torch"]["median_ms"] / results["auto"]["median_ms"],
        "auto_vs_per_row_loop": results["per_row_loop"]["median_ms"] / results["auto"]["median_ms"],
        "auto_x_floor": results["auto"]["x_floor"],
        "sampling_auto_vs_torch": samp_res["torch"]["median_ms"] / samp_res["auto"]["median_ms"],
    }
    payload = {"bench": "tau_budget_step", "meta": metadata(dev), "auto_backend": auto_name,
               "shape": {"R": R, "K": K, "V": V, "dtype": str(dtype).replace("torch.", ""), "strategy": "tau_budget",
                         "temperature": 0.0},
               "bytes_read": nbytes, "bytes_formula": "R*K*V*sizeof(dtype)", "floor": floor_name,
               "timing": "round-robin over candidates, median of rounds, wall clock (perf_counter; CUDA synced)",
               "results": results, "sampling_T1": {"results": samp_res, "token_agreement_vs_torch": tok_agree},
               "speedups": speed, "greedy_seconds": greedy_s}
    path = write_result(out_dir, "tau_budget", payload, load_before=load_before, allow_loaded=args.allow_loaded)
    label = "GPU " + str(payload["meta"]["gpu"]) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"tau_budget_step  R={R} K={K} V={V} {payload['shape']['dtype']}  ({label}; auto = {auto_name}; {path})")
    print_table("greedy (T = 0), tau_budget", results, floor_ms)
    print_table("sampling (T = 1), tau_budget", samp_res, samp_res[floor_name]["median_ms"])
    print("speedups: " + ", ".join(f"{k} {v:.2f}" for k, v in speed.items() if v is not None))


if __name__ == "__main__":
    main()
