"""``slim-rl ablate``: the block-size study — SLIM-RL vs TraceRL vs random masking, and the ablation table.

One command runs both parts on one config (``configs/paper_k16.yaml``: the digit-shift task, K = 16)::

    slim-rl ablate --config configs/paper_k16.yaml --seeds 0 1 2 --jobs 2 --out benchmarks/results

* **compare** (``<out>/paper_k16``): objectives ``slim``, ``tracerl`` and ``random`` from the same SFT
  model per seed, the same rollout budget (Q prompts × G samples per RL step, same RL steps): held-out
  greedy accuracy against training samples (rows through forward+backward) and rollouts; tokens per
  forward, generation length and mask ratio over training; KL and clip fraction; and the training
  samples each objective needs to reach TraceRL's best held-out accuracy (paired by seed).
* **ablations** (``<out>/ablations``): every row one change from the default SLIM-RL setting, same
  budget — per-block schedule shape, quadrature nodes vs uniform random levels, n_q, ratio level,
  rollout decode rule (with the commit risk, EWC, of each in the training data), shared clean stream
  (speed only).

Every (setting, seed) is one *unit* with its own run folder under ``train.out_dir``
(``seed<s>/<setting>``): finished units (``result.json``) are skipped, interrupted ones continue from
their last checkpoint, so rerunning the same command resumes the study. SFT runs once per seed
(``seed<s>/sft_ckpt``); ``--jobs`` units run in parallel processes (one torch thread each). The
summaries and plots are written from whatever units have finished (missing ones are listed), also
with ``--summarize-only``.

Intervals: 95% Student-t intervals over seeds (mean ± t_{0.975, n−1}·s/√n); with one seed there is none.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import platform
import time
from typing import Any

from slim_rl.config import Config, apply_overrides, to_dict
from slim_rl.errors import UserError

__all__ = ["COMPARE", "ABLATIONS", "STUDIES", "run_study", "summarize", "t_interval", "markdown_table"]

# (name, what changes, overrides) — compare objectives; "slim" is also the default row of the ablations
COMPARE: list[tuple[str, str, list[str]]] = [
    ("slim", "SLIM-RL (default)", ["objective.name=slim"]),
    ("tracerl", "TraceRL trajectory slicing", ["objective.name=tracerl"]),
    ("random", "TraceRL random masking", ["objective.name=random"]),
]
ABLATIONS: list[tuple[str, str, list[str]]] = [
    ("slim", "default: cosine decreasing schedule, Gauss-Legendre n_q=3, sequence ratio, tau-budget, "
             "shared clean stream", ["objective.name=slim"]),
    ("schedule_flat", "per-block schedule flat (sigma=0)", ["objective.spread=0.0"]),
    ("schedule_increasing", "per-block schedule cosine increasing", ["objective.decreasing=false"]),
    ("schedule_linear", "per-block schedule linear decreasing", ["objective.shape=linear"]),
    ("nodes_uniform", "uniformly random mask levels (3 per response, weight 1/3)", ["objective.nodes=uniform"]),
    ("nq1", "n_q=1", ["objective.num_nodes=1"]),
    ("nq2", "n_q=2", ["objective.num_nodes=2"]),
    ("nq5", "n_q=5", ["objective.num_nodes=5"]),
    ("level_block", "importance ratio per block", ["objective.level=block"]),
    ("level_token", "importance ratio per token", ["objective.level=token"]),
    ("decode_threshold", "rollouts decoded with the threshold rule", ["rollout.strategy=threshold"]),
    ("decode_topk", "rollouts decoded with the top-k rule (floor commits per step)", ["rollout.strategy=topk"]),
    ("shared_clean_off", "one clean stream per row (speed only: same rows and loss)",
     ["objective.shared_clean=false"]),
]
STUDIES = ("compare", "ablations", "all")
EXTEND = 3  # the *_long runs: slim and random continued to EXTEND x the RL steps (rollouts) of the budget


def _extended(cfg: Config) -> list[tuple[str, str, list[str]]]:
    """slim and random continued past the shared budget, for the samples each needs to reach TraceRL's best
    (the first ``train.steps`` steps repeat the same-budget run: every step is seeded by (seed, step))."""
    return [(f"{n}_long", f"{what}, continued to {EXTEND}x the rollouts",
             ov + [f"train.steps={EXTEND * cfg.train.steps}"]) for n, what, ov in COMPARE if n != "tracerl"]


_STEP_KEYS = ("reward", "response_len", "tokens_per_forward", "mask_ratio", "kl", "clip_frac", "ratio_mean",
              "ewc_per_step", "commits_per_step", "rows", "loss", "step_s", "rollout_s")
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_interval(xs: list[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of the 95% Student-t interval over ``xs`` (no interval for fewer than 2)."""
    n = len(xs)
    if n == 0:
        return float("nan"), None, None
    m = sum(xs) / n
    if n < 2:
        return m, None, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = _T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return m, m - h, m + h


def _atomic_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _seed_cfg(cfg: Config, seed: int, work: str) -> Config:
    return apply_overrides(cfg, [f"train.seed={seed}", f"model.seed={seed}", "train.time_limit_s=0",
                                 f"train.out_dir={os.path.join(work, f'seed{seed}', 'sft')}"])


def _sft_unit(cfg_dict: dict, seed: int, work: str) -> dict[str, Any]:
    """SFT once per seed: checkpoint + ``sft.json`` (greedy held-out accuracy before RL)."""
    import torch

    from slim_rl.checkpoint import save_checkpoint
    from slim_rl.config import Config, from_dict
    from slim_rl.demo import prepare

    torch.set_num_threads(1)
    done = os.path.join(work, f"seed{seed}", "sft.json")
    if (res := _read(done)) is not None:
        return res
    base = apply_overrides(_seed_cfg(from_dict(Config, cfg_dict), seed, work), ["train.checkpoint_every=0"])
    t0 = time.time()
    trainer, facts = prepare(base, overwrite=True, progress=False)
    ckpt = os.path.join(work, f"seed{seed}", "sft_ckpt")
    path = save_checkpoint(ckpt, 0, trainer.model)
    before = trainer.evaluate()["accuracy"]
    task = trainer.task
    res = {"seed": seed, "accuracy_before": before, "sft_seconds": facts["sft_seconds"],
           "sft_final_loss": facts.get("sft_final_loss"), "checkpoint": path, "wall_seconds": time.time() - t0}
    if hasattr(task, "flawed_fraction"):
        res["eval_flawed_fraction"] = task.flawed_fraction(task.eval_set())
    _atomic_json(done, res)
    return res


def _rl_unit(cfg_dict: dict, seed: int, work: str, name: str, overrides: list[str],
             sft_seed: int | None = None) -> dict[str, Any]:
    """One RL run from the SFT checkpoint of ``sft_seed`` (default: ``seed``); resumes its own last
    checkpoint; ``result.json``."""
    import torch

    from slim_rl.checkpoint import load_checkpoint
    from slim_rl.compare import accuracy_points
    from slim_rl.config import Config, from_dict
    from slim_rl.runs import latest_checkpoint
    from slim_rl.trainer import Trainer, build_model

    torch.set_num_threads(1)
    d = os.path.join(work, f"seed{seed}", name)
    done = os.path.join(d, "result.json")
    if (res := _read(done)) is not None:
        return res
    sft_seed = seed if sft_seed is None else sft_seed
    sft = _read(os.path.join(work, f"seed{sft_seed}", "sft.json"))
    if sft is None:
        raise RuntimeError(f"seed {sft_seed}: the SFT stage has not finished")
    c = apply_overrides(_seed_cfg(from_dict(Config, cfg_dict), seed, work), overrides + [f"train.out_dir={d}"])
    model = build_model(c, "cpu")
    load_checkpoint(sft["checkpoint"], model, None, restore_rng=False)
    tr = Trainer(c, model=model)
    resume = latest_checkpoint(os.path.join(d, "checkpoints")) is not None
    t0 = time.time()
    hist = tr.train(resume=resume, progress=False)
    before = sft["accuracy_before"]
    points = accuracy_points(tr, hist, before)
    steps = [{"step": r["step"], "train_rows": r["train_rows"], "rollouts": r["rollouts"],
              **{k: r[k] for k in _STEP_KEYS if k in r}} for r in hist]
    res = {"name": name, "seed": seed, "sft_seed": sft_seed, "overrides": overrides, "accuracy_before": before,
           "accuracy_after": points[-1]["accuracy"], "best_accuracy": max(p["accuracy"] for p in points[1:]),
           "points": points, "steps": steps, "train_rows": tr.counters["train_rows"],
           "rollouts": tr.counters["rollouts"],
           "train_seconds": sum(r.get("step_s", 0.0) for r in hist),
           "update_seconds": sum(r.get("step_s", 0.0) - r.get("rollout_s", 0.0) for r in hist),
           "rollout_seconds": sum(r.get("rollout_s", 0.0) for r in hist),
           "resumed": resume, "wall_seconds_this_call": time.time() - t0}
    _atomic_json(done, res)
    return res


class _Inline:
    """``--jobs 1``: the units run in this process (an executor's submit / as_completed interface)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args) -> cf.Future:
        f: cf.Future = cf.Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - surfaced by f.result() like a pool's future
            f.set_exception(e)
        return f


def _speed_unit(cfg_dict: dict, work: str, sft_seed: int, reps: int = 5) -> dict[str, Any]:
    """The shared clean stream on / off timed on the same rows: one rollout batch from the SFT model, then the
    update step (logp_old + 2 minibatches of forward+backward) alternately with ``objective.shared_clean``
    true / false, ``reps`` times each, from the same weights every time; medians, in one process."""
    import copy as _copy
    import statistics

    import torch

    from slim_rl.checkpoint import load_checkpoint
    from slim_rl.config import Config, from_dict
    from slim_rl.trainer import Trainer, build_model

    torch.set_num_threads(1)
    done = os.path.join(work, "speed_shared_clean.json")
    if (res := _read(done)) is not None:
        return res
    sft = _read(os.path.join(work, f"seed{sft_seed}", "sft.json"))
    if sft is None:
        raise RuntimeError(f"seed {sft_seed}: the SFT stage has not finished")
    times: dict[bool, list[float]] = {True: [], False: []}
    rows: dict[bool, int] = {}
    base = _seed_cfg(from_dict(Config, cfg_dict), sft_seed, work)
    trainers = {}
    for shared in (True, False):
        c = apply_overrides(base, [f"objective.shared_clean={str(shared).lower()}", "advantage.filter_groups=false",
                                   f"train.out_dir={os.path.join(work, 'speed_shared_clean')}"])
        model = build_model(c, "cpu")
        load_checkpoint(sft["checkpoint"], model, None, restore_rng=False)
        trainers[shared] = Trainer(c, model=model)
    batch = trainers[True].rollout(1)
    state = _copy.deepcopy(trainers[True].model.state_dict())
    for _ in range(reps):
        for shared in (True, False):
            tr = trainers[shared]
            tr.model.load_state_dict(state)
            tr.optimizer.state.clear()
            t0 = time.perf_counter()
            rec = tr.update(batch, 1)
            times[shared].append(time.perf_counter() - t0)
            rows[shared] = rec["rows"]
    res = {"what": "update step (logp_old + E x minibatches forward+backward + AdamW) on one rollout batch of the SFT "
                   "model, groups unfiltered; median of reps, the two settings alternated in one process, 1 thread",
           "reps": reps, "responses": len(batch), "rows": rows[True],
           "shared_clean_on_s": statistics.median(times[True]), "shared_clean_off_s": statistics.median(times[False]),
           "all_on_s": times[True], "all_off_s": times[False]}
    res["speedup"] = res["shared_clean_off_s"] / res["shared_clean_on_s"]
    _atomic_json(done, res)
    return res


def _settings(study: str, cfg: Config) -> list[tuple[str, str, list[str]]]:
    if study not in STUDIES:
        raise UserError(f"ablate: --study must be one of {', '.join(STUDIES)}, got {study!r}")
    out = list(COMPARE) + _extended(cfg) if study in ("compare", "all") else []
    if study in ("ablations", "all"):
        out += [s for s in ABLATIONS if s[0] not in {o[0] for o in out}]
    return out


def run_study(cfg: Config, *, seeds: list[int], out: str, study: str = "all", jobs: int = 2,
              summarize_only: bool = False, command: str = "", log=None,
              sft_seed: int | None = None) -> dict[str, Any]:
    """Run (or resume) every unit of ``study`` for ``seeds`` with ``jobs`` processes, then summarize.
    ``log``: one line per finished unit (default: print, flushed — the study usually runs under nohup).
    ``sft_seed``: every seed's RL starts from this seed's SFT model (one SFT run; the seeds then vary the
    RL randomness only, as runs from one released checkpoint do); default: one SFT run per seed."""
    if log is None:
        def log(msg: str) -> None:
            print(msg, flush=True)

    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"ablate: --seeds must be distinct, got {seeds}")
    if jobs < 1:
        raise UserError(f"ablate: --jobs must be >= 1, got {jobs}")
    settings = _settings(study, cfg)
    work = cfg.train.out_dir
    os.makedirs(work, exist_ok=True)
    cfg_dict = to_dict(cfg)
    t0 = time.time()
    if not summarize_only:
        ctx = multiprocessing.get_context("spawn")
        pool = _Inline() if jobs == 1 else cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
        with pool as ex:
            sft_seeds = seeds if sft_seed is None else [sft_seed]
            futs = {ex.submit(_sft_unit, cfg_dict, s, work): s for s in sft_seeds}
            for f in cf.as_completed(futs):
                r = f.result()
                log(f"[{time.time() - t0:6.0f} s] SFT seed {futs[f]}: greedy held-out accuracy "
                    f"{r['accuracy_before']:.3f}")
            # seed-major within each setting, compare objectives first: partial results stay balanced
            units = [(name, ov, s) for name, _, ov in settings for s in seeds]
            futs = {ex.submit(_rl_unit, cfg_dict, s, work, name, ov, sft_seed): (name, s) for name, ov, s in units}
            failed = []
            for f in cf.as_completed(futs):
                name, s = futs[f]
                try:
                    r = f.result()
                except Exception as e:  # noqa: BLE001 - one failed unit must not lose the others
                    failed.append(f"{name}/seed{s}: {e}")
                    log(f"[{time.time() - t0:6.0f} s] {name} seed {s} FAILED: {e}")
                    continue
                log(f"[{time.time() - t0:6.0f} s] {name} seed {s}: {r['accuracy_before']:.3f} -> "
                    f"{r['accuracy_after']:.3f} ({r['train_rows']} rows, {r['train_seconds']:.0f} s)")
        if study in ("ablations", "all"):  # alone, after the runs: a timing
            r = _speed_unit(cfg_dict, work, seeds[0] if sft_seed is None else sft_seed)
            log(f"[{time.time() - t0:6.0f} s] shared clean stream: update {r['shared_clean_on_s']:.2f} s on, "
                f"{r['shared_clean_off_s']:.2f} s off ({r['rows']} rows)")
    res = summarize(cfg, seeds=seeds, out=out, study=study, command=command, sft_seed=sft_seed)
    res["wall_seconds_this_call"] = time.time() - t0
    return res


def _ci(xs: list[float]) -> dict[str, Any]:
    m, lo, hi = t_interval(xs)
    return {"mean": m, "ci95": None if lo is None else [lo, hi], "n": len(xs)}


def _mean_curve(results: list[dict], key: str, xkey: str) -> list[dict[str, Any]]:
    """Mean over seeds of ``key`` at each recorded point (points aligned by index; shortest run wins)."""
    if not results:
        return []
    n = min(len(r[xkey]) for r in results)
    out = []
    for i in range(n):
        row = {k: sum(r[xkey][i][k] for r in results) / len(results) for k in ("step", "train_rows", "rollouts")}
        vals = [r[xkey][i][key] for r in results if key in r[xkey][i]]
        if not vals:
            continue
        ci = _ci(vals)
        row.update({"mean": ci["mean"], "ci95": ci["ci95"]})
        out.append(row)
    return out


def _first_reach(points: list[dict], target: float) -> int | None:
    """Training rows at the first evaluation (after step 0) whose accuracy reaches ``target``."""
    for p in points[1:]:
        if p["accuracy"] >= target - 1e-9:
            return int(p["train_rows"])
    return None


def _collect(work: str, seeds: list[int], names: list[str]) -> tuple[dict[str, list[dict]], list[str]]:
    got: dict[str, list[dict]] = {n: [] for n in names}
    missing = []
    for n in names:
        for s in seeds:
            r = _read(os.path.join(work, f"seed{s}", n, "result.json"))
            if r is None:
                missing.append(f"{n}/seed{s}")
            else:
                got[n].append(r)
    return got, missing


def summarize(cfg: Config, *, seeds: list[int], out: str, study: str = "all", command: str = "",
              sft_seed: int | None = None) -> dict[str, Any]:
    """Write ``<out>/paper_k16`` and/or ``<out>/ablations`` (summary.json, plots) from the finished units."""
    import torch

    from slim_rl.compare import _git_sha

    work = cfg.train.out_dir
    sft_seeds = seeds if sft_seed is None else [sft_seed]
    sfts = {s: _read(os.path.join(work, f"seed{s}", "sft.json")) for s in sft_seeds}
    common = {"command": command, "git_sha": _git_sha(), "seeds": seeds, "block_size": cfg.rollout.block_size,
              "sft_seed": sft_seed, "sft": {str(s): v for s, v in sfts.items()},
              "task": {"name": cfg.task.name, "length": cfg.task.length, "flaw_from": cfg.task.flaw_from,
                       "demo_error": cfg.task.demo_error, "num_eval": cfg.task.num_eval},
              "budget": {"rl_steps": cfg.train.steps, "prompts_per_step": cfg.rollout.prompts_per_step,
                         "group_size": cfg.rollout.group_size, "epochs": cfg.optim.epochs,
                         "minibatches": cfg.optim.minibatches, "eval_every": cfg.eval.every},
              "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "torch_threads_per_process": 1,
              "accuracy_before": {str(s): (v or {}).get("accuracy_before") for s, v in sfts.items()},
              "interval": "95% Student-t over seeds: mean +- t(0.975, n-1) * sd / sqrt(n)",
              "config": to_dict(cfg)}
    written: dict[str, Any] = {}
    if study in ("compare", "all"):
        written["paper_k16"] = _summarize_compare(work, seeds, os.path.join(out, "paper_k16"), common,
                                                  [n for n, _, _ in _extended(cfg)])
    if study in ("ablations", "all"):
        written["ablations"] = _summarize_ablations(work, seeds, os.path.join(out, "ablations"), common)
    return written


def _summarize_compare(work: str, seeds: list[int], out: str, common: dict, long_names: list[str]) -> dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    names = [n for n, _, _ in COMPARE]
    got, missing = _collect(work, seeds, names + long_names)
    curves = {}
    for n in names:
        rs = sorted(got[n], key=lambda r: r["seed"])
        curves[n] = {
            "accuracy": _mean_curve(rs, "accuracy", "points"),
            **{k: _mean_curve(rs, k, "steps") for k in ("tokens_per_forward", "response_len", "mask_ratio", "kl",
                                                        "clip_frac", "ratio_mean", "reward", "ewc_per_step",
                                                        "rows")},
            "final_accuracy": _ci([r["accuracy_after"] for r in rs]),
            "best_accuracy": _ci([r["best_accuracy"] for r in rs]),
            "train_rows": _ci([r["train_rows"] for r in rs]),
            "rollouts": _ci([r["rollouts"] for r in rs]),
            "train_seconds": _ci([r["train_seconds"] for r in rs]),
            "per_seed": [{"seed": r["seed"], "accuracy_before": r["accuracy_before"],
                          "accuracy_after": r["accuracy_after"], "best_accuracy": r["best_accuracy"],
                          "train_rows": r["train_rows"], "points": r["points"]} for r in rs],
        }
    # samples (training rows) to reach TraceRL's best held-out accuracy, paired by seed: within the shared
    # rollout budget, and with slim / random continued to EXTEND x the rollouts (the *_long runs)
    trace = {r["seed"]: r for r in got.get("tracerl", [])}
    match = _match(names, {n: got[n] for n in names}, trace)
    runs_long = {n: got.get(f"{n}_long") or got[n] for n in names}
    match_long = _match(names, runs_long, trace)
    for n in names:
        match_long[n]["runs"] = f"{n}_long" if got.get(f"{n}_long") else n
    extended = {f"{n}_long": {"accuracy": _mean_curve(sorted(got[f"{n}_long"], key=lambda r: r["seed"]), "accuracy",
                                                       "points"),
                              "final_accuracy": _ci([r["accuracy_after"] for r in got[f"{n}_long"]]),
                              "best_accuracy": _ci([r["best_accuracy"] for r in got[f"{n}_long"]]),
                              "train_rows": _ci([r["train_rows"] for r in got[f"{n}_long"]]),
                              "rollouts": _ci([r["rollouts"] for r in got[f"{n}_long"]])}
                for n in names if got.get(f"{n}_long")}
    summary = {
        "what": "held-out greedy accuracy vs training samples (rows through forward+backward) and rollouts; "
                "tokens per forward, generation length, mask ratio, KL and clip fraction over training; "
                "slim vs tracerl vs random from the same SFT model and the same rollout budget",
        **common, "objectives": names, "missing": missing, "curves": curves, "extended_curves": extended,
        "samples_to_match_tracerl_best": match_long,
        "samples_to_match_tracerl_best_same_budget": match,
        "samples_to_match_definition": "per seed: target = TraceRL's best held-out accuracy over its evaluations "
                                       "(after step 0, same-budget run); rows = training rows at an objective's "
                                       "first evaluation reaching it (null = not reached); mean and 95% t-interval "
                                       "over the seeds that reached it; ratio_to_tracerl = rows / TraceRL's own "
                                       f"rows. samples_to_match_tracerl_best uses slim / random continued to "
                                       f"{EXTEND}x the rollouts (runs: *_long); *_same_budget stops at the shared "
                                       "rollout budget",
    }
    _atomic_json(os.path.join(out, "summary.json"), summary)
    summary["plots"] = plot_study_compare(curves, out, title=f"K={common['block_size']}, {len(seeds)} seeds",
                                          extended=extended)
    return summary


def _match(names: list[str], runs: dict[str, list[dict]], trace: dict[int, dict]) -> dict[str, Any]:
    match: dict[str, Any] = {}
    for n in names:
        per_seed, ratios = [], []
        for r in sorted(runs[n], key=lambda r: r["seed"]):
            t = trace.get(r["seed"])
            if t is None:
                continue
            target = t["best_accuracy"]
            rows = _first_reach(r["points"], target)
            t_rows = _first_reach(t["points"], target)
            per_seed.append({"seed": r["seed"], "target": target, "rows": rows, "tracerl_rows": t_rows})
            if rows is not None and t_rows:
                ratios.append(rows / t_rows)
        reached = [p["rows"] for p in per_seed if p["rows"] is not None]
        match[n] = {"rows": _ci([float(x) for x in reached]), "reached": len(reached), "of": len(per_seed),
                    "ratio_to_tracerl": _ci(ratios), "per_seed": per_seed}
    return match


def _summarize_ablations(work: str, seeds: list[int], out: str, common: dict) -> dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    names = [n for n, _, _ in ABLATIONS]
    got, missing = _collect(work, seeds, names)
    rows = []
    for name, setting, ov in ABLATIONS:
        rs = sorted(got[name], key=lambda r: r["seed"])
        if not rs:
            continue
        acc = _ci([r["accuracy_after"] for r in rs])
        best = _ci([r["best_accuracy"] for r in rs])
        ewc = [sum(s.get("ewc_per_step", 0.0) for s in r["steps"]) / max(len(r["steps"]), 1) for r in rs]
        tpf = [sum(s.get("tokens_per_forward", 0.0) for s in r["steps"]) / max(len(r["steps"]), 1) for r in rs]
        rows.append({
            "name": name, "setting": setting, "overrides": ov, "seeds": [r["seed"] for r in rs],
            "accuracy_mean": acc["mean"], "accuracy_ci95": acc["ci95"],
            "best_accuracy_mean": best["mean"], "best_accuracy_ci95": best["ci95"],
            "accuracy_before_mean": sum(r["accuracy_before"] for r in rs) / len(rs),
            "samples": sum(r["train_rows"] for r in rs) / len(rs),
            "rollouts": sum(r["rollouts"] for r in rs) / len(rs),
            "seconds": sum(r["train_seconds"] for r in rs) / len(rs),
            "update_seconds": sum(r["update_seconds"] for r in rs) / len(rs),
            "rollout_seconds": sum(r["rollout_seconds"] for r in rs) / len(rs),
            "rollout_ewc_per_step": sum(ewc) / len(ewc), "rollout_tokens_per_forward": sum(tpf) / len(tpf),
        })
    speed = _read(os.path.join(work, "speed_shared_clean.json"))
    summary = {"shared_clean_speed": speed,
               "what": "one change from the default SLIM-RL setting per row, same rollout budget; accuracy = "
                       "held-out greedy accuracy after the last RL step; samples = training rows; seconds = "
                       "RL time (rollout + update, no evaluation) per run, 2 runs in parallel on 2 shared CPU "
                       "cores (noisy); rollout_ewc_per_step = expected wrong commits per decode step in the "
                       "training rollouts (commit risk)",
               **common, "missing": missing, "rows": rows}
    _atomic_json(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")
    summary["plots"] = plot_ablation(rows, os.path.join(out, "ablations.png"))
    return summary


def markdown_table(rows: list[dict]) -> str:
    """The ablation rows as a Markdown table (accuracy with its 95% t-interval)."""
    out = ["| row | setting | accuracy after RL (95% CI) | best eval | samples (rows) | RL seconds | "
           "update s | rollout EWC/step | tokens/forward | seeds |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r["accuracy_ci95"]
        ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        out.append(f"| {r['name']} | {r['setting']} | {r['accuracy_mean']:.3f}{ci_s} | {r['best_accuracy_mean']:.3f} | "
                   f"{r['samples']:.0f} | {r['seconds']:.1f} | {r['update_seconds']:.1f} | "
                   f"{r['rollout_ewc_per_step']:.3f} | {r['rollout_tokens_per_forward']:.2f} | {len(r['seeds'])} |")
    return "\n".join(out)


_COLORS = {"slim": "tab:blue", "tracerl": "tab:orange", "random": "tab:green"}


def _band(ax, pts: list[dict], xkey: str, label: str, color: str | None) -> None:
    xs = [p[xkey] for p in pts]
    ax.plot(xs, [p["mean"] for p in pts], "o-" if len(pts) < 12 else "-", label=label, color=color, ms=3)
    if pts and all(p["ci95"] is not None for p in pts):
        ax.fill_between(xs, [p["ci95"][0] for p in pts], [p["ci95"][1] for p in pts], color=color, alpha=0.15)


def plot_study_compare(curves: dict[str, dict], out: str, *, title: str,
                       extended: dict[str, dict] | None = None) -> list[str]:
    """accuracy vs rows / rollouts (95% bands; the *_long runs dashed), and the training dynamics."""
    from slim_rl.plots import _plt

    plt = _plt()
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, xkey, xl in ((axes[0], "train_rows", "training samples (rows through forward+backward)"),
                         (axes[1], "rollouts", "rollouts (decoded responses)")):
        for n, c in curves.items():
            _band(ax, c["accuracy"], xkey, n, _COLORS.get(n))
        for n, c in (extended or {}).items():
            pts = c["accuracy"]
            ax.plot([p[xkey] for p in pts], [p["mean"] for p in pts], "--", lw=1, label=f"{n} ({EXTEND}x rollouts)",
                    color=_COLORS.get(n.removesuffix("_long")))
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out greedy accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"held-out accuracy, mean and 95% t-band ({title})")
    fig.tight_layout()
    paths.append(os.path.join(out, "accuracy.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    keys = [("tokens_per_forward", "tokens per forward (rollouts)"), ("response_len", "generation length"),
            ("mask_ratio", "mask ratio |M|/L1 of the training rows"), ("rows", "training rows per step"),
            ("kl", "KL (k3) to the step's start"), ("clip_frac", "clip fraction")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (k, lab) in zip(axes.flat, keys):
        for n, c in curves.items():
            if c.get(k):
                _band(ax, c[k], "step", n, _COLORS.get(n))
        ax.set_xlabel("RL step")
        ax.set_title(lab, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(f"training dynamics, mean over seeds ({title})")
    fig.tight_layout()
    paths.append(os.path.join(out, "dynamics.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_ablation(rows: list[dict], path: str) -> list[str]:
    """Final held-out accuracy per ablation row with its 95% interval."""
    from slim_rl.plots import _plt

    if not rows:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        ci = r["accuracy_ci95"]
        err = None if ci is None else [[r["accuracy_mean"] - ci[0]], [ci[1] - r["accuracy_mean"]]]
        ax.errorbar([r["accuracy_mean"]], [y], xerr=err, fmt="o", color="tab:blue" if r["name"] != "slim"
                    else "tab:red", capsize=3)
    ax.axvline(rows[0]["accuracy_before_mean"], color="gray", ls="--", lw=1, label="after SFT")
    ax.set_yticks(ys)
    ax.set_yticklabels([r["name"] for r in rows])
    ax.set_xlabel("held-out greedy accuracy after RL (mean, 95% t-interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
