"""The embedded demo: masked-diffusion SFT of a tiny SDAR-shaped model on the addition task, then
SLIM-RL; greedy held-out accuracy before and after, ``summary.json`` and plots in the run folder.

The defaults of :class:`slim_rl.config.Config` are the demo's settings (``configs/demo.yaml`` spells
them out). ``slim-rl demo`` runs it; ``--resume`` continues an interrupted demo from its last
checkpoint (the SFT result is checkpoint 0, so a resumed demo never repeats SFT). A new demo into a folder that
holds an earlier run needs ``--overwrite`` (or ``--resume``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from slim_rl import distributed as D
from slim_rl.checkpoint import check_run_folder
from slim_rl.config import Config
from slim_rl.plots import plot_run
from slim_rl.sft import sft
from slim_rl.trainer import Trainer, build_model

__all__ = ["run_demo", "prepare"]


def _cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def prepare(cfg: Config, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> tuple[Trainer, dict[str, Any]]:
    """Model + task + SFT stage (or the resumed checkpoint); returns the trainer and SFT facts.

    The run folder is checked first (:func:`slim_rl.checkpoint.check_run_folder`: an earlier run needs
    ``resume`` or ``overwrite``; ``resume`` needs a checkpoint), stale temporary checkpoint directories
    are removed, and with ``overwrite`` the earlier run's files go only once SFT has succeeded.
    """
    check_run_folder(cfg.train.out_dir, resume=resume, overwrite=overwrite)
    info = D.init(cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    model = build_model(cfg, info.device)
    trainer = Trainer(cfg, model=model, info=info, overwrite=overwrite)
    trainer.clean_stale()
    facts: dict[str, Any] = {"sft_seconds": 0.0, "sft_steps": 0}
    if resume:
        facts["resumed_from"] = trainer.resume()
        return trainer, facts
    t0 = time.time()
    records = sft(trainer, progress=progress and info.is_main)
    facts["sft_seconds"] = time.time() - t0
    facts["sft_steps"] = cfg.sft.steps
    facts["sft_final_loss"] = records[-1]["sft_loss"] if records else None
    # a fresh optimizer state for RL (SFT used its own); checkpoint 0 = the SFT model
    trainer.optimizer.state.clear()
    trainer.claim_folder()
    if cfg.train.checkpoint_every:
        trainer.save()
    return trainer, facts


def run_demo(cfg: Config, *, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """SFT → greedy accuracy → SLIM-RL → greedy accuracy; writes summary.json + plots; returns the summary.

    The last RL step is always checkpointed, so ``slim-rl eval`` of the run gives ``accuracy_after``."""
    t0 = time.time()
    trainer, facts = prepare(cfg, resume=resume, overwrite=overwrite, progress=progress)
    info = trainer.info
    before_path = os.path.join(cfg.train.out_dir, "accuracy_before.json")
    if resume and os.path.exists(before_path):
        with open(before_path) as f:
            before = json.load(f)["accuracy"]
    else:
        before = trainer.evaluate()["accuracy"]
        trainer.claim_folder()
        if info.is_main:
            with open(before_path, "w") as f:
                json.dump({"accuracy": before}, f)
    if info.is_main and progress:
        print(f"greedy held-out accuracy after SFT: {before:.3f}", flush=True)
    t_rl = time.time()
    history = trainer.train(resume=False, progress=progress)
    rl_seconds = time.time() - t_rl
    after = trainer.evaluate()["accuracy"]
    wall = time.time() - t0
    summary = {
        "accuracy_before": before,
        "accuracy_after": after,
        "improvement": after - before,
        "rl_steps": trainer.step,
        "train_samples": trainer.counters["train_rows"],
        "rollouts": trainer.counters["rollouts"],
        "wall_seconds": wall,
        "cpu_seconds": _cpu_seconds(),
        "sft_seconds": facts["sft_seconds"],
        "rl_seconds": rl_seconds,
        "objective": cfg.objective.name,
        "task": cfg.task.name,
        "eval_prompts": len(trainer.task.eval_set()),
        "seed": cfg.train.seed,
        "world_size": info.world,
        "torch_threads": torch.get_num_threads(),
        **({"resumed_from": facts["resumed_from"]} if "resumed_from" in facts else {}),
    }
    if info.is_main:
        with open(os.path.join(cfg.train.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        summary["plots"] = plot_run(trainer.history or history, cfg.train.out_dir, before=before,
                                    title=f"{cfg.objective.name} on {cfg.task.name}")
        if progress:
            print(f"greedy held-out accuracy: before RL {before:.3f} -> after RL {after:.3f} "
                  f"({100 * (after - before):+.1f} points) in {wall:.0f} s "
                  f"[{trainer.step} RL steps, {summary['train_samples']} training rows]", flush=True)
            print(f"run folder: {cfg.train.out_dir}", flush=True)
    return summary
