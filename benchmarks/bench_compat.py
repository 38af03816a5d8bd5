"""Patched call sites: slim_ops.compat drop-ins against the functions they replace, same inputs, same process.

Each "original" below restates a published helper (per-row Python loop, fp64 softmax over the whole
[R, K, V] logits, torch.topk per row); the candidate is the slim_ops.compat function a user imports instead.
Before timing, every pair must return identical outputs (torch.equal on x0 and the transfer mask / the block).
Candidates are timed round-robin (one call of each per round), median of the rounds, on the same tensors.

  python benchmarks/bench_compat.py                 (CPU, R=64, K=16, V=151936 fp32; writes benchmarks/results/cpu)
  python benchmarks/bench_compat.py --reps 2 --vocab 4096   (quick)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from benchmarks.common import add_load_flag, machine_load, metadata, write_result  # noqa: E402
from slim_ops import compat  # noqa: E402

NINF = float("-inf")


# --- the originals (published semantics, restated) -------------------------------------------------------------

def orig_num_transfer(mask_index, steps):
    n = mask_index.sum(dim=1, keepdim=True)
    out = torch.zeros(n.size(0), steps, dtype=torch.int64) + n // steps
    for i in range(n.size(0)):
        out[i, : int(n[i] % steps)] += 1
    return out


def orig_fast_dllm(logits, temperature, remasking, mask_index, x, ntt, threshold=None):
    x0 = torch.argmax(logits, dim=-1)  # temperature 0: no Gumbel noise
    p = F.softmax(logits.to(torch.float64), dim=-1)
    score = p.gather(-1, x0[..., None])[..., 0]
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, score, NINF)
    out = torch.zeros_like(x0, dtype=torch.bool)
    ks = mask_index.sum(dim=1, keepdim=True) if threshold is not None else ntt
    for j in range(conf.shape[0]):
        _, idx = torch.topk(conf[j], k=int(ks[j]))
        out[j, idx] = True
        if threshold is not None:
            for r in range(1, int(ks[j])):
                if conf[j, idx[r]] < threshold:
                    out[j, idx[r]] = False
    return x0, out


def orig_slim_rl(logits, temperature, target, mask_index, x, ntt, threshold=None, remasking_strategy=None,
                 tau_budget_m=1.0):
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    score = p.gather(-1, x0[..., None])[..., 0]
    x0 = torch.where(mask_index, x0, x)
    if remasking_strategy == "tau_budget_dynamic" and threshold is not None:
        conf = score.masked_fill(~mask_index, NINF)
        out = torch.zeros_like(x0, dtype=torch.bool)
        for j in range(conf.shape[0]):
            n = int(mask_index[j].sum().item())
            if n == 0:
                continue
            base = int(ntt[j].item())
            budget = (tau_budget_m if tau_budget_m > 0 else base) * (1.0 - threshold)
            above = conf[j][conf[j] > threshold]
            kb = 0
            if above.numel() > 0:
                srt, _ = torch.sort(above, descending=True)
                kb = int((torch.cumsum(1.0 - srt, 0) <= budget).sum().item())
            k = min(max(kb, base), n)
            if k > 0:
                out[j, torch.topk(conf[j], k).indices] = True
        return x0, out
    selected = mask_index & (score >= threshold)
    none_sel = (~selected.any(dim=-1)) & mask_index.any(dim=-1)
    if none_sel.any():
        best = score.masked_fill(~mask_index, NINF).argmax(dim=-1)
        rows = torch.nonzero(none_sel).squeeze(-1)
        selected[rows, best[rows]] = True
    return x0, selected


def orig_sdar_step(logits, cur_x, mask_id, ntt, step, temperature, thr):
    mask_index = cur_x == mask_id
    B, K, V = logits.shape
    z = logits.reshape(-1, V)
    if temperature != 1.0:
        z = z / temperature
    probs = F.softmax(z, dim=-1)
    tok = torch.multinomial(probs, 1)
    x0, x0_p = tok.view(B, K), probs.gather(-1, tok).view(B, K)
    conf = torch.where(mask_index, x0_p, NINF)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    n = ntt[step]
    for j in range(B):
        high = conf[j] > thr
        if high.sum() >= n:
            transfer[j] = high
        else:
            transfer[j, torch.topk(conf[j], int(n)).indices] = True
    cur_x[transfer] = x0[transfer]
    return cur_x


# --- benchmark ---------------------------------------------------------------------------------------------------

def _round_robin(cands: dict, reps: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {k: [] for k in cands}
    for fn in cands.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in cands.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "runs": len(v)} for k, v in times.items()}


def _equal(a, b) -> bool:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"))
    ap.add_argument("--no-write", action="store_true")
    add_load_flag(ap)
    a = ap.parse_args()
    load_before = machine_load()
    R, K, V = a.rows, a.block, a.vocab
    mask_id = V - 1
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(R, K, V, generator=g) * 4
    x = torch.randint(0, V - 1, (R, K), generator=g)
    mask = torch.rand(R, K, generator=g) < 0.75
    x = torch.where(mask, mask_id, x)
    ntt = torch.full((R,), 2, dtype=torch.int64)
    sdar_ntt = compat.sdar_get_num_transfer_tokens(K, K // 2)

    def seeded(fn):
        def run():
            torch.manual_seed(1)
            return fn()
        return run

    cases = {
        "llada_get_num_transfer_tokens (steps=8)": (
            lambda: orig_num_transfer(mask, 8), lambda: compat.get_num_transfer_tokens(mask, 8)),
        "fast_dllm_get_transfer_index low_confidence top-k (k=2)": (
            lambda: orig_fast_dllm(logits, 0.0, "low_confidence", mask, x, ntt),
            lambda: compat.fast_dllm_get_transfer_index(logits, 0.0, "low_confidence", mask, x, ntt)),
        "fast_dllm_get_transfer_index low_confidence threshold=0.9": (
            lambda: orig_fast_dllm(logits, 0.0, "low_confidence", mask, x, None, 0.9),
            lambda: compat.fast_dllm_get_transfer_index(logits, 0.0, "low_confidence", mask, x, None, 0.9)),
        "slim_rl_get_transfer_index confidence tau_budget_dynamic (tau=0.9, m=1)": (
            lambda: orig_slim_rl(logits, 0.0, "confidence", mask, x, ntt, 0.9, "tau_budget_dynamic", 1.0),
            lambda: compat.slim_rl_get_transfer_index(logits, 0.0, "confidence", mask, x, ntt, 0.9,
                                                      remasking_strategy="tau_budget_dynamic", tau_budget_m=1.0)),
        "slim_rl_get_transfer_index confidence threshold=0.9": (
            lambda: orig_slim_rl(logits, 0.0, "confidence", mask, x, ntt, 0.9),
            lambda: compat.slim_rl_get_transfer_index(logits, 0.0, "confidence", mask, x, ntt, 0.9)),
        "sdar_block_step low_confidence_dynamic T=1 (sampling)": (
            seeded(lambda: orig_sdar_step(logits, x.clone(), mask_id, sdar_ntt, 0, 1.0, 0.9)),
            seeded(lambda: compat.sdar_block_step(logits, x.clone(), mask_id, sdar_ntt, 0, temperature=1.0,
                                                  remasking_strategy="low_confidence_dynamic",
                                                  confidence_threshold=0.9))),
    }
    results = []
    for name, (orig, ours) in cases.items():
        same = _equal(orig(), ours())
        if not same:
            raise SystemExit(f"{name}: compat output differs from the original; not timing it")
        t = _round_robin({"original": orig, "compat": ours}, a.reps)
        speedup = t["original"]["median_ms"] / t["compat"]["median_ms"]
        results.append({"call_site": name, "original": t["original"], "compat": t["compat"],
                        "speedup": speedup, "outputs_equal": same})
        print(f"{name:75s} original {t['original']['median_ms']:9.2f} ms   compat {t['compat']['median_ms']:9.2f} ms"
              f"   {speedup:6.2f}x", flush=True)
    payload = {"meta": {**metadata("cpu"), "shape": {"R": R, "K": K, "V": V, "dtype": "float32"},
                        "reps": a.reps, "masked_fraction": float(mask.float().mean())},
               "results": results}
    if not a.no_write:
        print("wrote", write_result(a.out, "bench_compat", payload, load_before=load_before,
                                    allow_loaded=a.allow_loaded))


if __name__ == "__main__":
    main()
