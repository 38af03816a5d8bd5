"""Decode-step demo: greedy and sampled τ-budget steps on random logits, per strategy, then a CPU timing
table of the vectorised torch backend vs a per-row loop shaped like the upstream engines.

    python -m slim_rl demo-decode
"""

from __future__ import annotations

import time

import torch

import slim_ops
from slim_ops.ops.tau_budget.reference import per_row_loop


def _median_ms(fn, reps: int = 3) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def main(R: int = 8, K: int = 16, V: int = 32000, timing_rows: int = 16, timing_vocab: int = 151936) -> None:
    g = torch.Generator().manual_seed(0)
    mask_id = V - 1
    logits = torch.randn(R, K, V, generator=g)
    logits[..., 0] += 8.0 + torch.rand(R, K, generator=g) * 10  # a mix of confident and unsure slots
    block = torch.full((R, K), mask_id)
    print(f"One denoising step, R={R} rows, K={K} slots, V={V}, tau=0.9, m=1, floor=1 (torch backend, CPU)")
    print(f"{'strategy':<12}{'T':>5}{'commits/row':>13}{'risk/row':>10}{'max risk':>10}  budget b=0.1")
    for temperature in (0.0, 1.0):
        for strategy in ("tau_budget", "threshold", "topk"):
            out = slim_ops.tau_budget_step(logits, block, mask_id, tau=0.9, m=1.0, floor=1, strategy=strategy,
                                           temperature=temperature, generator=torch.Generator().manual_seed(1))
            n = out.num_committed.float()
            print(f"{strategy:<12}{temperature:>5.1f}{n.mean().item():>13.2f}{out.risk.mean().item():>10.4f}"
                  f"{out.risk.max().item():>10.4f}")
    Rt, Vt = timing_rows, timing_vocab
    lt = torch.randn(Rt, K, Vt, generator=g) * 3
    lt[..., :8] += 12.0
    bt = torch.full((Rt, K), Vt - 1)
    t_fast = _median_ms(lambda: slim_ops.tau_budget_step(lt, bt, Vt - 1, backend="torch"))
    t_loop = _median_ms(lambda: per_row_loop(lt, bt, Vt - 1))
    same = torch.equal(slim_ops.tau_budget_step(lt, bt, Vt - 1, backend="torch").block, per_row_loop(lt, bt, Vt - 1))
    print(f"\nCPU timing, R={Rt}, K={K}, V={Vt}, fp32 logits, greedy (median of 3; same commits: {same})")
    print(f"  slim_ops torch backend : {t_fast:9.1f} ms")
    print(f"  per-row fp64 loop      : {t_loop:9.1f} ms   ({t_loop / t_fast:.1f}x slower)")


if __name__ == "__main__":
    main()
