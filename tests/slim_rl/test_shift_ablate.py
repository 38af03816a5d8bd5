"""The digit-shift task family (long answers, flawed demonstrator), uniform mask levels in the SLIM rows,
and the ``slim-rl ablate`` study driver (intervals, samples-to-match, summaries; one tiny end-to-end
unit). CPU, a few seconds."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
       "OMP_NUM_THREADS": "1"}


def _shift(p):
    k = p[-1]
    return [(d + k) % 10 for d in p[:-1]]


def test_shift_task_answers_demonstrations_and_split():
    from slim_rl.tasks import ShiftTask

    t = ShiftTask(length=8, demo_error=1.0, flaw_from=3, num_eval=50, seed=3)
    ev = t.eval_set()
    assert len(ev) == 50 and len({tuple(e.prompt) for e in ev}) == 50
    for e in ev:
        assert len(e.prompt) == 8 + 3 and e.prompt[8] == t.plus and e.prompt[-1] == t.equals
        digits, k = e.prompt[:8], e.prompt[9]
        assert 1 <= k <= 9 and list(e.answer) == [(d + k) % 10 for d in digits]
    held = {tuple(e.prompt) for e in ev}
    rng = random.Random(0)
    assert not held & {tuple(e.prompt) for e in t.sample(500, rng)}
    # demo_error = 1: every large shift (k >= 3, k != 5) is shifted the wrong way, the others are right
    for prompt, resp in t.demonstrations(300, random.Random(1)):
        # EOS repeated up to a multiple of 16 tokens (no pad inside the answer's last block)
        assert prompt not in [list(h) for h in held] and resp[8:] == [t.eos_id] * 8
        digits, k = prompt[:8], prompt[9]
        want = [(d - k) % 10 for d in digits] if (k >= 3 and k != 5) else [(d + k) % 10 for d in digits]
        assert resp[:8] == want
    clean = ShiftTask(length=8, demo_error=0.0, num_eval=5)
    for prompt, resp in clean.demonstrations(50, random.Random(2)):
        assert resp[:8] == [(d + prompt[9]) % 10 for d in prompt[:8]]


def test_shift_task_reward_and_inputs():
    from slim_rl.tasks import ShiftTask

    t = ShiftTask(length=6, num_eval=4, seed=0)
    ex = t.eval_set()
    good = list(ex[0].answer)
    assert t.reward([good + [t.eos_id], good, good[:-1] + [t.eos_id], good + [3, t.eos_id]], [ex[0]] * 4) == \
        [1.0, 1.0, 0.0, 0.0]
    assert 0.0 <= t.flawed_fraction(ex) <= 1.0
    for kw, msg in (({"length": 3}, "length"), ({"demo_error": 1.5}, "demo_error"), ({"flaw_from": 0}, "flaw_from"),
                    ({"num_eval": 0}, "num_eval")):
        with pytest.raises(ValueError, match=msg):
            ShiftTask(**kw)


def test_shift_config_keys_and_vocabulary_rule():
    from slim_rl.config import ConfigError, load_config
    from slim_rl.tasks import ShiftTask, make_task

    cfg = load_config(os.path.join(ROOT, "configs", "paper_k16.yaml"))
    assert cfg.rollout.block_size == 16 and cfg.task.name == "shift"
    task = make_task(cfg.task)
    assert isinstance(task, ShiftTask) and task.max_answer_len == cfg.task.length + 1
    assert 16 <= task.max_answer_len <= 48 <= 2 * cfg.rollout.max_new_tokens  # two blocks at K = 16, four at 8
    assert all(len(r) % 16 == 0 for _, r in task.demonstrations(20, random.Random(0)))
    with pytest.raises(ConfigError, match="vocab_size must be 16 for task.name=shift"):
        load_config(None, ["task.name=shift", "model.vocab_size=32"])
    with pytest.raises(ConfigError, match="task.flaw_from"):
        load_config(None, ["task.name=shift", "task.flaw_from=11"])
    with pytest.raises(ConfigError, match="objective.nodes"):
        load_config(None, ["objective.nodes=random"])


def test_slim_rows_uniform_levels():
    import slim_ops

    B, L1, K, Q = 64, 32, 16, 3
    ids = torch.randint(0, 10, (B, L1), generator=torch.Generator().manual_seed(0))
    lens = torch.full((B,), L1)
    gl = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=15, pad_id=13, num_nodes=Q,
                                  generator=torch.Generator().manual_seed(1))
    un = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=15, pad_id=13, num_nodes=Q, nodes="uniform",
                                  generator=torch.Generator().manual_seed(1))
    _, w = slim_ops.quadrature(Q)
    assert torch.allclose(gl.weights, w.repeat(B))
    assert torch.all(un.weights == 1.0 / Q) and un.noisy_ids.shape == (B * Q, L1)
    # Gauss-Legendre: the middle node masks ~half of every row; uniform levels: rows spread over [0, 1]
    frac_un = un.loss_mask.float().mean(1)
    frac_mid = gl.loss_mask.float().mean(1).view(B, Q)[:, 1]
    assert abs(float(frac_mid.mean()) - 0.5) < 0.06
    assert float(frac_un.std()) > 0.2 and float(frac_un.min()) < 0.15 and float(frac_un.max()) > 0.85
    assert torch.equal(un.noisy_ids == 15, un.loss_mask)  # full-length rows: noise set = loss set
    with pytest.raises(ValueError, match="nodes must be one of"):
        slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=15, pad_id=13, nodes="sobol")


def test_t_interval_and_first_reach():
    from slim_rl.ablate import _first_reach, t_interval

    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(hi - m, 4.303 * 1.0 / math.sqrt(3), rel_tol=1e-6) and math.isclose(m - lo, hi - m)
    assert t_interval([5.0])[1:] == (None, None) and math.isnan(t_interval([])[0])
    pts = [{"train_rows": 0, "accuracy": 0.9}, {"train_rows": 10, "accuracy": 0.4}, {"train_rows": 20, "accuracy": 0.6},
           {"train_rows": 30, "accuracy": 0.7}]
    assert _first_reach(pts, 0.6) == 20 and _first_reach(pts, 0.65) == 30 and _first_reach(pts, 0.8) is None


def _fake(work, seed, name, accs, rows_per_eval):
    d = os.path.join(work, f"seed{seed}", name)
    os.makedirs(d, exist_ok=True)
    pts = [{"step": 5 * i, "rollouts": 40 * i, "train_rows": rows_per_eval * i, "accuracy": a}
           for i, a in enumerate(accs)]
    steps = [{"step": s, "train_rows": 0, "rollouts": 0, "tokens_per_forward": 2.0, "response_len": 32.0,
              "mask_ratio": 0.5, "kl": 0.01, "clip_frac": 0.1, "ewc_per_step": 0.2, "rows": 10}
             for s in range(1, 11)]
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump({"name": name, "seed": seed, "accuracy_before": accs[0], "accuracy_after": accs[-1],
                   "best_accuracy": max(accs[1:]), "points": pts, "steps": steps, "train_rows": pts[-1]["train_rows"],
                   "rollouts": pts[-1]["rollouts"], "train_seconds": 3.0, "update_seconds": 2.0,
                   "rollout_seconds": 1.0}, f)


def test_summaries_from_finished_units(tmp_path):
    from slim_rl.ablate import summarize
    from slim_rl.config import load_config

    work = str(tmp_path / "runs")
    cfg = load_config(os.path.join(ROOT, "configs", "paper_k16.yaml"), [f"train.out_dir={work}"])
    for s in (0, 1, 2):
        _fake(work, s, "tracerl", [0.3, 0.4, 0.5], 100)      # best 0.5 at 200 rows
        _fake(work, s, "slim", [0.3, 0.5, 0.6], 30 + s)      # reaches 0.5 at 30 + s rows
        _fake(work, s, "schedule_flat", [0.3, 0.35, 0.4], 30)
    res = summarize(cfg, seeds=[0, 1, 2], out=str(tmp_path / "out"), command="slim-rl ablate ...", sft_seed=0)
    comp = json.load(open(tmp_path / "out" / "paper_k16" / "summary.json"))
    assert comp["block_size"] == 16 and comp["seeds"] == [0, 1, 2] and comp["command"] == "slim-rl ablate ..."
    assert comp["sft_seed"] == 0 and list(comp["sft"]) == ["0"]
    m = comp["samples_to_match_tracerl_best"]
    assert m["slim"]["rows"]["mean"] == 31.0 and m["slim"]["reached"] == 3 and m["tracerl"]["rows"]["mean"] == 200
    assert math.isclose(m["slim"]["ratio_to_tracerl"]["mean"], 31 / 200)
    assert m["random"]["of"] == 0 and "random/seed0" in comp["missing"]
    assert comp["curves"]["slim"]["accuracy"][1]["mean"] == 0.5
    abl = json.load(open(tmp_path / "out" / "ablations" / "summary.json"))
    names = [r["name"] for r in abl["rows"]]
    assert names == ["slim", "schedule_flat"] and "nq1/seed0" in abl["missing"]
    row = abl["rows"][1]
    assert row["accuracy_mean"] == pytest.approx(0.4) and row["accuracy_ci95"] == pytest.approx([0.4, 0.4])
    assert row["samples"] == 60 and row["seconds"] == 3.0 and row["seeds"] == [0, 1, 2]
    assert all(os.path.exists(p) for p in res["paper_k16"]["plots"] + res["ablations"]["plots"])


def test_ablate_cli_runs_and_resumes(tmp_path):
    """One tiny end-to-end study (1 seed, compare objectives only); a rerun skips the finished units."""
    out, work = str(tmp_path / "res"), str(tmp_path / "runs")
    cmd = [sys.executable, "-m", "slim_rl", "ablate", "--config", os.path.join(ROOT, "configs", "paper_k16.yaml"),
           "--out", out, "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
           "task.length=7", "rollout.max_new_tokens=8", "rollout.block_size=4", "task.num_eval=8",
           "sft.steps=2", "sft.batch_size=8", "train.steps=2", "eval.every=1", "train.checkpoint_every=1",
           "rollout.prompts_per_step=2", "rollout.group_size=2", "advantage.filter_groups=false",
           f"train.out_dir={work}", "--study", "compare", "--jobs", "1", "--seeds", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    comp = json.load(open(os.path.join(out, "paper_k16", "summary.json")))
    assert comp["missing"] == [] and set(comp["curves"]) == {"slim", "tracerl", "random"}
    assert comp["block_size"] == 4 and len(comp["curves"]["slim"]["accuracy"]) == 3
    first = os.path.getmtime(os.path.join(work, "seed0", "slim", "result.json"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert os.path.getmtime(os.path.join(work, "seed0", "slim", "result.json")) == first
    bad = subprocess.run(cmd[:-2] + ["--seeds", "0", "0"], capture_output=True, text=True, env=ENV,
                         cwd=str(tmp_path), timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("slim-rl: error: ablate: --seeds must be distinct")
