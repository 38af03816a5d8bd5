"""Plots written at the end of a run (matplotlib, Agg backend; PNG files)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["plot_run", "plot_compare"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    """Lay out, write (PNG, 120 dpi) and close one figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(history: Sequence[dict[str, Any]], out_dir: str, *, before: float | None = None,
             title: str = "") -> list[str]:
    """reward / held-out accuracy vs training samples, EWC / commits per decode step vs RL step, and KL /
    clip fraction / |mean ratio − 1| vs RL step."""
    plt = _plt()
    rl = [r for r in history if "reward" in r]
    if not rl:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["train_rows"] for r in rl]
    ax.plot(x, [r["reward"] for r in rl], label="rollout reward", alpha=0.6)
    ev = [(r["train_rows"], r["eval_accuracy"]) for r in rl if "eval_accuracy" in r]
    if before is not None:
        ev = [(0, before)] + ev
    if ev:
        ax.plot([e[0] for e in ev], [e[1] for e in ev], "o-", label="held-out greedy accuracy")
    ax.set_xlabel("training samples (rows)")
    ax.set_ylabel("accuracy / reward")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "SLIM-RL")
    paths.append(_save(plt, fig, os.path.join(out_dir, "reward_accuracy.png")))

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rl]
    ax.plot(steps, [r["ewc_per_step"] for r in rl], label="EWC per decode step")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["commits_per_step"] for r in rl], color="tab:orange", label="commits per decode step")
    ax.set_xlabel("RL step")
    ax.set_ylabel("expected wrong commits")
    ax2.set_ylabel("commits")
    ax.grid(alpha=0.3)
    fig.legend(loc="upper right")
    paths.append(_save(plt, fig, os.path.join(out_dir, "ewc_commits.png")))

    upd = [r for r in rl if "kl" in r]
    if upd:  # the off-policy side of the update: KL to the step's start, clip fraction, mean ratio
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in upd]
        ax.plot(steps, [r["kl"] for r in upd], label="KL (to the step's start)")
        ax.set_xlabel("RL step")
        ax.set_ylabel("KL")
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("clip_frac", 0.0) for r in upd], color="tab:red", label="clip fraction")
        ax2.plot(steps, [abs(r.get("ratio_mean", 1.0) - 1.0) for r in upd], color="tab:green", ls="--",
                 label="|mean ratio - 1|")
        ax2.set_ylabel("clip fraction / |ratio - 1|")
        ax.grid(alpha=0.3)
        fig.legend(loc="upper right")
        paths.append(_save(plt, fig, os.path.join(out_dir, "kl_clip.png")))
    return paths


def plot_compare(curves: dict[str, list[tuple[float, float]]], path: str, *, xlabel: str, title: str) -> str:
    """One line per method: (x, accuracy) points, e.g. held-out accuracy vs training samples."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(plt, fig, path)
