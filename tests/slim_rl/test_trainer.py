"""The RL loop: a step changes the model as the objective says, a run killed from outside resumes exactly,
non-finite updates are skipped and stop a diverging run, the TraceRL objective runs. Tiny sizes (CPU, a few
seconds per run); the command line itself is tested in test_cli.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
       "OMP_NUM_THREADS": "1"}

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "sft.steps=0", "rollout.prompts_per_step=4", "rollout.group_size=4", "task.num_eval=16",
        "eval.every=0", "train.tensorboard=false", "train.threads=1", "train.progress=false",
        "advantage.filter_groups=false", "optim.epochs=2", "optim.minibatches=2", "optim.micro_batch_rows=7",
        "optim.lr=1e-3"]

# A task a random tiny model gets about half right (reward: the first response token is even), so every
# RL step has non-zero advantages and really moves the weights.
SCRIPT = textwrap.dedent('''
    import json, random, sys
    import torch
    from slim_rl.config import load_config
    from slim_rl.tasks import AdditionTask
    from slim_rl.trainer import Trainer

    class EvenFirst(AdditionTask):
        def reward(self, responses, examples):
            return [1.0 if len(r) and int(r[0]) % 2 == 0 else 0.0 for r in responses]

    out, resume, overrides = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
    cfg = load_config(None, overrides + [f"train.out_dir={out}"])
    torch.set_num_threads(1)
    tr = Trainer(cfg, task=EvenFirst(digits=1, num_eval=8))
    tr.train(resume=resume)
''')


def _cmd(tmp_path, out, resume, extra):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    return [sys.executable, str(script), str(out), "1" if resume else "0", *TINY, *extra]


def _run(tmp_path, out, resume, extra):
    return subprocess.run(_cmd(tmp_path, out, resume, extra), env=ENV, capture_output=True, text=True, timeout=300)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


_VOLATILE = {"rollout_s", "step_s"}


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    """SIGKILL from outside after checkpoint 2, then resume: the metrics and weights equal the
    uninterrupted run's (every random choice of step s is seeded by (seed, s))."""
    from slim_rl import checkpoint as C
    from slim_rl.config import load_config
    from slim_rl.trainer import build_model

    steps = 6
    extra = [f"train.steps={steps}", "train.checkpoint_every=2", "train.keep_checkpoints=0"]
    a = _run(tmp_path, tmp_path / "A", False, extra)
    assert a.returncode == 0, a.stderr[-3000:]
    p = subprocess.Popen(_cmd(tmp_path, tmp_path / "B", False, extra), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if C.latest_checkpoint(str(tmp_path / "B" / "checkpoints")):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.returncode                 # really killed mid-run
    assert 2 <= len(_records(tmp_path / "B" / "metrics.jsonl")) < steps
    with open(tmp_path / "B" / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "rew')                                      # a line torn by the kill
    c = _run(tmp_path, tmp_path / "B", True, extra)
    assert c.returncode == 0, c.stderr[-3000:]
    ra, rb = _records(tmp_path / "A" / "metrics.jsonl"), _records(tmp_path / "B" / "metrics.jsonl")
    assert [r["step"] for r in ra] == list(range(1, steps + 1)) == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            if k not in _VOLATILE:
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), (x["step"], k, x[k], y[k])
    # the model really trained: the loss and KL are live, and weights moved between checkpoints
    assert any(abs(r.get("kl", 0.0)) > 0 for r in ra)
    assert all(r["rows"] > 0 for r in ra)
    cfg = load_config(str(tmp_path / "A" / "config.yaml"))
    wa, wb, w2 = build_model(cfg), build_model(cfg), build_model(cfg)
    C.load_weights(str(tmp_path / "A" / "checkpoints" / f"step_{steps:08d}"), wa)
    C.load_weights(str(tmp_path / "B" / "checkpoints" / f"step_{steps:08d}"), wb)
    C.load_weights(str(tmp_path / "A" / "checkpoints" / "step_00000002"), w2)
    assert all(torch.equal(x, y) for x, y in zip(wa.parameters(), wb.parameters()))
    assert any(not torch.equal(x, y) for x, y in zip(wa.parameters(), w2.parameters()))


def _trainer(objective="slim", extra=()):
    from slim_rl.config import load_config
    from slim_rl.tasks import AdditionTask
    from slim_rl.trainer import Trainer

    class EvenFirst(AdditionTask):
        def reward(self, responses, examples):
            return [1.0 if len(r) and int(r[0]) % 2 == 0 else 0.0 for r in responses]

    cfg = load_config(None, TINY + [f"objective.name={objective}", "train.out_dir=/tmp/unused", *extra])
    return Trainer(cfg, task=EvenFirst(digits=1, num_eval=8))


@pytest.mark.parametrize("objective", ["slim", "tracerl"])
def test_update_follows_the_advantage(objective):
    """Raising the log-prob of positively rewarded responses: after one update on a fixed batch the
    positive responses' mean log-prob rises relative to the negative ones'."""

    torch.manual_seed(0)
    tr = _trainer(objective, ["optim.epochs=1", "optim.minibatches=1", "optim.lr=3e-3",
                              "objective.kl_coef=0.0"])
    batch = tr.rollout(1)
    n = len(batch)
    batch.rewards = (torch.arange(n) % 2 == 0).float()        # half right in every group
    rows = tr.build_rows(batch, 1)
    assert rows["rows"] > 0
    if objective == "slim":
        assert rows["rows"] == 3 * n                           # n_q = 3 rows per response
        assert torch.equal(torch.bincount(torch.arange(rows["rows"]) // 3), torch.full((n,), 3))
    before = tr._logp_old(rows)
    pos = rows["advantages"] > 0
    rec = tr.update(batch, 1)
    after = tr._logp_old(rows)
    mask = rows["loss_mask"]
    gain = ((after - before) * mask).sum(1) / mask.sum(1)
    assert gain[pos].mean() > gain[~pos].mean(), (gain[pos].mean(), gain[~pos].mean())
    assert rec["rows"] == rows["rows"] and rec["grad_norm"] > 0


def test_tracerl_rows_come_from_step_maps():
    tr = _trainer("tracerl")
    batch = tr.rollout(1)
    rows = tr.build_rows(batch, 1)
    # rows per response = distinct decode steps per block (shrink 1), at least one row each
    assert rows["rows"] >= len(batch)
    assert bool(rows["loss_mask"].any(dim=1).all())
    assert torch.equal(rows["weights"], torch.ones(rows["rows"]))


def test_non_finite_updates_are_skipped_and_stop_the_run(tmp_path):
    """A NaN in the loss (here: a KL weight of NaN slipped past the config) skips every update — the
    weights stay as they were, finite — counts the skips, and after train.max_skipped_updates in a row the
    run stops with a clear error before any checkpoint is written."""
    from slim_rl.errors import TrainingError

    torch.manual_seed(0)
    tr = _trainer("slim", [f"train.out_dir={tmp_path / 'run'}", "train.checkpoint_every=1",
                           "train.max_skipped_updates=3"])
    w0 = [p.detach().clone() for p in tr.model.parameters()]
    tr.cfg.objective.kl_coef = float("nan")
    batch = tr.rollout(1)
    batch.rewards = (torch.arange(len(batch)) % 2 == 0).float()
    rec = tr.update(batch, 1)
    assert rec["skipped_updates"] == 4 and tr.bad_streak == 4 and tr.updates == 0   # 2 epochs x 2 minibatches
    assert math.isnan(rec["loss"]) and "grad_norm" not in rec
    assert all(torch.equal(a, b) for a, b in zip(w0, tr.model.parameters()))
    with pytest.raises(TrainingError, match="non-finite loss or gradient norm .*max_skipped_updates=3"):
        tr.train()
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    # a finite update resets the streak
    tr.cfg.objective.kl_coef = 0.01
    rec = tr.update(batch, 2)
    assert rec["skipped_updates"] == 0 and tr.bad_streak == 0 and tr.updates == 4


def test_dense_mask_and_slim_attention_paths_agree():
    """The trainer's [P ‖ C ‖ X] forward gives the same hidden states with the dense 4D mask and with
    slim_ops' block-diffusion attention (the HF integration), ragged prompts included."""
    from slim_rl.config import load_config
    from slim_rl.tasks import pad_left
    from slim_rl.trainer import build_model, noisy_stream_hidden

    cfg = load_config(None, ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
                             "model.num_kv_heads=1"])
    dense = build_model(cfg)
    slim = build_model(load_config(None, ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
                                          "model.num_kv_heads=1", "model.attention=slim"]))
    g = torch.Generator().manual_seed(0)
    prompt, ppad = pad_left([[1, 2, 3], [4, 5, 6, 7, 8], [9]], dense.pad_id)
    clean = torch.randint(0, 12, (3, 6), generator=g)
    noisy = torch.where(torch.rand(3, 6, generator=g) < 0.5, dense.mask_id, clean)
    with torch.no_grad():
        a = noisy_stream_hidden(dense, prompt, ppad, clean, noisy, 2)
        b = noisy_stream_hidden(slim, prompt, ppad, clean, noisy, 2)
    assert a.shape == (3, 6, 32)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_shared_clean_stream_gives_the_same_update():
    """docs/attention.md, 'Shared clean stream': packing one clean stream with the n_q noisy streams changes no
    number."""
    torch.manual_seed(0)
    ov = ["optim.minibatches=1", "optim.epochs=1"]
    a = _trainer("slim", ov + ["objective.shared_clean=true"])
    b = _trainer("slim", ov + ["objective.shared_clean=false"])
    b.model.load_state_dict(a.model.state_dict())
    batch = a.rollout(1)
    batch.rewards = (torch.arange(len(batch)) % 3 == 0).float()
    assert a.build_rows(batch, 1)["group"] == 3 and b.build_rows(batch, 1)["group"] == 1
    grads = {}
    for name, tr in (("a", a), ("b", b)):   # record the gradient each optimizer step sees
        step = tr.optimizer.step

        def record(*args, _step=step, _tr=tr, _name=name, **kw):
            grads[_name] = [p.grad.clone() for p in _tr.model.parameters()]
            return _step(*args, **kw)

        tr.optimizer.step = record
    ra, rb = a.update(batch, 1), b.update(batch, 1)
    for k in ("loss", "policy_loss", "grad_norm", "entropy"):
        assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
    assert ra["grad_norm"] > 0
    for (name, _), ga, gb in zip(a.model.named_parameters(), grads["a"], grads["b"]):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7), (name, (ga - gb).abs().max())
