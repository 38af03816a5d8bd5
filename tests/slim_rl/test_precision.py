"""Mixed precision at the paper's numerics: master weights, gradients and AdamW state in fp32, forwards in
bf16. With ``model.dtype=bfloat16 optim.lr=1e-6`` the master weights really move (a bf16 master would round
almost every update away), the first update equals the fp32 run's up to the forward's bf16 rounding, and a
bf16 master with AdamW is refused unless asked for explicitly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_trainer import TINY  # noqa: E402

PAPER = ["model.dtype=bfloat16", "optim.lr=1e-6", "objective.kl_coef=0.01"]


def _trainer(tmp_path, name, extra=()):
    from slim_rl.config import load_config
    from slim_rl.tasks import AdditionTask
    from slim_rl.trainer import Trainer

    class EvenFirst(AdditionTask):  # about half right for a random model: every step has advantages
        def reward(self, responses, examples):
            return [1.0 if len(r) and int(r[0]) % 2 == 0 else 0.0 for r in responses]

    cfg = load_config(None, TINY + ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
                                    "model.num_kv_heads=2", f"train.out_dir={tmp_path / name}",
                                    "train.checkpoint_every=0", *extra])
    return Trainer(cfg, task=EvenFirst(digits=1, num_eval=8))


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def test_bf16_compute_at_lr_1e6_moves_the_fp32_master(tmp_path):
    """5 RL steps at the paper's bf16 / lr 1e-6: >= 99 % of the master weights in the last checkpoint
    differ from the start (fp32 checkpoint). The same run with a bf16 master (explicitly allowed) keeps
    most weights unchanged: the failure this guards against."""
    from slim_rl import checkpoint as C
    from slim_rl.trainer import build_model

    moved = {}
    for name, extra in (("mixed", PAPER), ("bf16_master", PAPER + ["model.master_dtype=bfloat16",
                                                                   "model.low_precision_master=true"])):
        tr = _trainer(tmp_path, name, [*extra, "train.steps=5"])
        start = _flat(tr.model)
        hist = tr.train()
        assert [r["step"] for r in hist] == [1, 2, 3, 4, 5] and all(r.get("grad_norm", 0) > 0 for r in hist)
        model = build_model(tr.cfg)
        C.load_weights(os.path.join(tr.ckpt_dir, "step_00000005"), model)
        assert next(model.parameters()).dtype == (torch.float32 if name == "mixed" else torch.bfloat16)
        moved[name] = float((_flat(model) != start).float().mean())
    print(f"weights changed after 5 RL steps at lr 1e-6: {moved}")
    assert moved["mixed"] >= 0.99, moved
    assert moved["bf16_master"] < 0.5, moved  # most updates round away in a bf16 master


def test_first_update_equals_fp32_within_bf16_rounding(tmp_path):
    """Same batch, same start: the bf16-compute run's first gradient equals the fp32 run's to within the
    forward's bf16 rounding (relative L2 error <= 3e-2: bf16 has 8 mantissa bits, ~4e-3 per rounding,
    compounded over two layers and the loss), and so does its first AdamW update (lr * m / sqrt(v): the
    sign of the gradient) on >= 97 % of the weights; every other weight moves by at most 2 lr."""
    from test_distributed import _fixed_batch

    ref = _trainer(tmp_path, "fp32", ["optim.lr=1e-6", "optim.epochs=1", "optim.minibatches=1"])
    mix = _trainer(tmp_path, "bf16", PAPER + ["optim.epochs=1", "optim.minibatches=1"])
    assert next(mix.model.parameters()).dtype == torch.float32 and mix.compute_dtype == torch.bfloat16
    start = _flat(ref.model)
    assert torch.equal(start, _flat(mix.model))
    batch = _fixed_batch(ref.pad_id, ref.eos_id)
    grads = {}
    for name, tr in (("fp32", ref), ("bf16", mix)):
        step = tr.optimizer.step

        def record(*a, _step=step, _tr=tr, _name=name, **kw):  # the gradient the optimizer steps with
            grads[_name] = torch.cat([p.grad.reshape(-1) for p in _tr.model.parameters()])
            return _step(*a, **kw)

        tr.optimizer.step = record
    r1, r2 = ref.update(batch, 1), mix.update(batch, 1)
    g1, g2 = grads["fp32"], grads["bf16"]
    assert g2.dtype == torch.float32
    rel = float((g1 - g2).norm() / g1.norm())
    assert rel <= 3e-2, rel
    assert r2["loss"] == pytest.approx(r1["loss"], abs=3e-2 * abs(r1["loss"]) + 1e-4)
    d1, d2 = _flat(ref.model) - start, _flat(mix.model) - start
    lr = 1e-6
    # |update| = lr (AdamW's first step), up to the fp32 rounding of the new weight (ulp(0.1) ~ 7e-9)
    assert float(d1.abs().max()) <= 1.02 * lr and float(d2.abs().max()) <= 1.02 * lr
    agree = float(((d1 - d2).abs() <= 0.02 * lr).float().mean())
    print(f"gradient relative L2 error {rel:.2e}, same update on {agree:.2%} of the weights")
    assert agree >= 0.97, agree


def test_bf16_master_with_adamw_is_one_config_line():
    r = subprocess.run([sys.executable, "-m", "slim_rl", "train", "model.master_dtype=bfloat16",
                        "model.dtype=bfloat16"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")])})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slim-rl: error: config: model.master_dtype=bfloat16"), r.stderr
    assert "model.low_precision_master=true" in lines[0]


def test_rollouts_decode_with_a_compute_dtype_copy(tmp_path):
    """The decode model is a bf16 copy (the master stays fp32 and untouched); the copy is dropped after."""
    tr = _trainer(tmp_path, "copy", PAPER)
    before = _flat(tr.model)
    with tr.decode_model() as m:
        assert m is not tr.model
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
        assert torch.equal(_flat(m), before.to(torch.bfloat16).float())
    out = tr.rollout(1)
    assert len(out) == 16 and torch.equal(_flat(tr.model), before)
    fp32 = _trainer(tmp_path, "copy32", [])
    with fp32.decode_model() as m:
        assert m is fp32.model


@pytest.mark.parametrize("attention", ["dense", "slim"])
def test_activation_checkpointing_same_loss_and_gradients(tmp_path, attention):
    """Per-layer activation checkpointing recomputes, it does not change the arithmetic: loss and every
    gradient equal the plain run's (fp32, <= 1e-6 relative), with the dense mask and with slim attention."""
    from test_distributed import _fixed_batch

    recs, grads = {}, {}
    for name, extra in (("plain", []), ("ckpt", ["model.gradient_checkpointing=true"])):
        tr = _trainer(tmp_path, f"{attention}_{name}", [f"model.attention={attention}", "optim.epochs=1",
                                                        "optim.minibatches=1", *extra])
        step = tr.optimizer.step

        def record(*a, _step=step, _tr=tr, _name=name, **kw):
            grads[_name] = [p.grad.clone() for p in _tr.model.parameters()]
            return _step(*a, **kw)

        tr.optimizer.step = record
        recs[name] = tr.update(_fixed_batch(tr.pad_id, tr.eos_id), 1)
    assert recs["ckpt"]["loss"] == pytest.approx(recs["plain"]["loss"], rel=1e-6, abs=1e-9)
    for a, b in zip(grads["plain"], grads["ckpt"]):
        assert float((a - b).norm()) <= 1e-6 * float(a.norm()) + 1e-12
    assert recs["plain"]["grad_norm"] > 0
