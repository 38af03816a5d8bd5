"""``slim-rl compare``: SLIM-RL vs the baselines on the same task with the same rollout budget.

Every objective starts from the same SFT checkpoint (trained once per seed), decodes the same number of
rollouts per step (Q prompts × G samples, τ-budget decoder) for the same number of RL steps, and is
evaluated (greedy, held-out prompts) at the same steps. What differs is only the objective
(``objective.name``): ``slim`` trains n_q quadrature rows per response with a per-block mask schedule;
``tracerl`` slices each response's decoding trajectory into up to K/shrink rows; ``random`` is
TraceRL's random-masking baseline (per-block Uniform(low, high) mask rates, ``objective.coupled`` adds
each row's complement). The JSON records held-out accuracy against RL steps, rollouts and training rows
(forward/backward sequences), plus wall time, for every seed; the plots show accuracy vs rows and vs
rollouts.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import subprocess
import time
from typing import Any

import torch

from slim_rl.config import Config, apply_overrides, to_dict
from slim_rl.errors import UserError
from slim_rl.plots import plot_compare

__all__ = ["run_compare", "OBJECTIVES"]

OBJECTIVES = ("slim", "tracerl", "random")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def accuracy_points(tr, hist: list[dict], before: float) -> list[dict[str, Any]]:
    """Held-out accuracy over training: the start, every periodic evaluation in ``hist``, and the final step
    (evaluated now when the last periodic evaluation was earlier)."""
    points = [{"step": 0, "rollouts": 0, "train_rows": 0, "accuracy": before}]
    points += [{"step": r["step"], "rollouts": r["rollouts"], "train_rows": r["train_rows"],
                "accuracy": r["eval_accuracy"]} for r in hist if "eval_accuracy" in r]
    if points[-1]["step"] != tr.step:
        points.append({"step": tr.step, "rollouts": tr.counters["rollouts"],
                       "train_rows": tr.counters["train_rows"], "accuracy": tr.evaluate()["accuracy"]})
    return points


def check_objectives(objectives) -> list[str]:
    """The objectives to compare, in order; a :class:`UserError` names a bad or repeated one."""
    objs = list(objectives)
    if not objs:
        raise UserError(f"compare: give at least one objective out of {', '.join(OBJECTIVES)}")
    for o in objs:
        if o not in OBJECTIVES:
            raise UserError(f"compare: unknown objective {o!r}; expected some of {', '.join(OBJECTIVES)}")
    if len(set(objs)) != len(objs):
        raise UserError(f"compare: objectives must not repeat, got {' '.join(objs)}")
    return objs


def run_compare(cfg: Config, *, seeds: list[int], out_dir: str, objectives=("slim", "tracerl"),
                progress: bool = True, command: str = "") -> dict[str, Any]:
    """Run every objective (``slim``, ``tracerl``, ``random``) for every seed from a shared SFT model;
    write compare JSON + plots to ``out_dir`` (runs, checkpoints and metrics go under
    ``cfg.train.out_dir``). All objectives get the same number of RL steps (``train.time_limit_s`` is
    switched off so none is cut short)."""
    from slim_rl.checkpoint import load_checkpoint, save_checkpoint
    from slim_rl.demo import prepare
    from slim_rl.trainer import Trainer, build_model

    objectives = check_objectives(objectives)
    os.makedirs(out_dir, exist_ok=True)
    work = cfg.train.out_dir
    t_all = time.time()
    runs: dict[str, list[dict[str, Any]]] = {o: [] for o in objectives}
    for seed in seeds:
        base = apply_overrides(cfg, [f"train.seed={seed}", f"model.seed={seed}", "train.checkpoint_every=0",
                                     "train.time_limit_s=0",
                                     f"train.out_dir={os.path.join(work, f'seed{seed}', 'sft')}"])
        trainer, facts = prepare(base, progress=progress)
        sft_ckpt = save_checkpoint(os.path.join(work, f"seed{seed}", "sft_ckpt"), 0, trainer.model)
        before = trainer.evaluate()["accuracy"]
        for obj in objectives:
            c = apply_overrides(copy.deepcopy(base), [
                f"objective.name={obj}", f"train.out_dir={os.path.join(work, f'seed{seed}', obj)}"])
            model = build_model(c, trainer.device)
            load_checkpoint(sft_ckpt, model, None, restore_rng=False)
            tr = Trainer(c, model=model, task=trainer.task, info=trainer.info)
            t0 = time.time()
            hist = tr.train(progress=progress)
            points = accuracy_points(tr, hist, before)
            runs[obj].append({
                "seed": seed, "accuracy_before": before, "accuracy_after": points[-1]["accuracy"],
                "points": points, "rl_seconds": time.time() - t0, "sft_seconds": facts["sft_seconds"],
                "rows_per_step": [r.get("rows", 0) for r in hist],
                "rollout_reward": [r["reward"] for r in hist],
                # the training dynamics per RL step (tokens per forward, generation length, mask ratio, ...)
                "steps": [{k: r[k] for k in ("step", "train_rows", "rollouts", "tokens_per_forward", "response_len",
                                             "mask_ratio", "kl", "clip_frac", "ratio_mean", "ewc_per_step")
                           if k in r} for r in hist],
            })
            if progress:
                print(f"[seed {seed}] {obj}: {before:.3f} -> {points[-1]['accuracy']:.3f} "
                      f"({tr.counters['train_rows']} rows, {time.time() - t0:.0f} s)", flush=True)

    def mean_curve(obj: str, key: str) -> list[tuple[float, float]]:
        rs = runs[obj]
        n = min(len(r["points"]) for r in rs)
        return [(sum(r["points"][i][key] for r in rs) / len(rs), sum(r["points"][i]["accuracy"] for r in rs) / len(rs))
                for i in range(n)]

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "what": f"held-out greedy accuracy vs RL budget, objectives {' vs '.join(objectives)}, same SFT start "
                "and rollout budget",
        "objectives": objectives,
        "command": command,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "git_sha": _git_sha(), "utc": stamp, "seeds": seeds,
        "config": to_dict(cfg), "runs": runs,
        "summary": {o: {
            "mean_accuracy_before": sum(r["accuracy_before"] for r in runs[o]) / len(runs[o]),
            "mean_accuracy_after": sum(r["accuracy_after"] for r in runs[o]) / len(runs[o]),
            "mean_train_rows": sum(r["points"][-1]["train_rows"] for r in runs[o]) / len(runs[o]),
            "mean_rollouts": sum(r["points"][-1]["rollouts"] for r in runs[o]) / len(runs[o]),
            "mean_rl_seconds": sum(r["rl_seconds"] for r in runs[o]) / len(runs[o]),
        } for o in objectives},
        "wall_seconds": time.time() - t_all,
    }
    path = os.path.join(out_dir, "compare.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    plot_compare({o: mean_curve(o, "train_rows") for o in objectives}, os.path.join(out_dir, "compare_rows.png"),
                 xlabel="training rows (sequences through forward+backward)",
                 title=f"held-out accuracy vs training rows (mean of {len(seeds)} seeds)")
    plot_compare({o: mean_curve(o, "rollouts") for o in objectives},
                 os.path.join(out_dir, "compare_rollouts.png"), xlabel="rollouts (decoded responses)",
                 title=f"held-out accuracy vs rollouts (mean of {len(seeds)} seeds)")
    result["json"] = path
    return result
