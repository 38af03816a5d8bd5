"""Trainer options of the objective: TraceRL's random-masking / coupled baselines, post-response tokens,
KL against a frozen reference model, the GRPO loss aggregations and the ratio cap δ, and
``slim-rl compare --objectives``. Tiny sizes (CPU, a few seconds each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
       "OMP_NUM_THREADS": "1"}

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "sft.steps=0", "rollout.prompts_per_step=4", "rollout.group_size=4", "task.num_eval=16",
        "eval.every=0", "train.tensorboard=false", "train.threads=1", "train.progress=false",
        "advantage.filter_groups=false", "optim.epochs=1", "optim.minibatches=1", "optim.lr=3e-3"]


def _trainer(extra, out="/tmp/unused"):
    from slim_rl.config import load_config
    from slim_rl.tasks import AdditionTask
    from slim_rl.trainer import Trainer

    class EvenFirst(AdditionTask):
        def reward(self, responses, examples):
            return [1.0 if len(r) and int(r[0]) % 2 == 0 else 0.0 for r in responses]

    torch.manual_seed(0)
    cfg = load_config(None, TINY + [f"train.out_dir={out}", *extra])
    return Trainer(cfg, task=EvenFirst(digits=1, num_eval=8))


def _batch(tr):
    batch = tr.rollout(1)
    batch.rewards = (torch.arange(len(batch)) % 2 == 0).float()  # half right in every group
    return batch


@pytest.mark.parametrize("coupled", [False, True])
def test_random_objective_rows_and_update(coupled):
    tr = _trainer(["objective.name=random", f"objective.coupled={str(coupled).lower()}", "objective.random_rows=2",
                   "objective.kl_coef=0"])
    batch = _batch(tr)
    rows = tr.build_rows(batch, 1)
    n = len(batch)
    L1 = rows["L1"]
    valid = torch.arange(L1)[None] < batch.response_len[:, None]
    assert rows["rows"] > 0 and rows["group"] == 1 and torch.equal(rows["weights"], torch.ones(rows["rows"]))
    resp_of_row = _response_of_rows(rows, batch)
    assert not bool((rows["loss_mask"] & ~valid[resp_of_row]).any())  # nothing after EOS (post_tokens=0)
    if coupled:
        # every draw's row and complement cover each response position exactly once: 2 draws -> twice
        per_resp = torch.zeros(n, L1, dtype=torch.int64)
        per_resp.index_add_(0, resp_of_row, rows["loss_mask"].long())
        assert torch.equal(per_resp, 2 * valid.long())
    before = [p.detach().clone() for p in tr.model.parameters()]
    rec = tr.update(batch, 1)
    assert rec["rows"] == rows["rows"] and rec["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def _response_of_rows(rows, batch):
    """The response each training row comes from (its clean stream is that response)."""
    L1 = rows["L1"]
    ids = torch.nn.functional.pad(batch.response_ids, (0, max(0, L1 - batch.response_ids.shape[1])), value=-1)
    same = (rows["clean"][:, None, :] == ids[None, :, :L1]).all(-1) & \
        (rows["advantages"][:, None] == torch.as_tensor(batch.rewards - 0.5)[None, :])
    return same.float().argmax(1)


def test_post_tokens_train_pads_after_the_response():
    for name in ("tracerl", "slim", "random"):
        tr = _trainer([f"objective.name={name}", "objective.post_tokens=2"])
        batch = _batch(tr)
        rows = tr.build_rows(batch, 1)
        n = batch.response_len[_response_of_rows(rows, batch)]
        pos = torch.arange(rows["L1"])[None]
        mask = rows["loss_mask"]
        assert not bool((mask & (pos >= n[:, None] + 2)).any()), name
        assert bool((mask & (pos >= n[:, None])).any()), name               # some positions after EOS train
        assert bool((rows["clean"][mask & (pos >= n[:, None])] == tr.pad_id).all()), name
        tr0 = _trainer([f"objective.name={name}"])
        b0 = _batch(tr0)
        r0 = tr0.build_rows(b0, 1)
        n0 = b0.response_len[_response_of_rows(r0, b0)]
        assert not bool((r0["loss_mask"] & (torch.arange(r0["L1"])[None] >= n0[:, None])).any()), name


def test_kl_reference_is_the_frozen_rl_start_model(tmp_path):
    tr = _trainer(["objective.kl_reference=ref", "objective.kl_coef=0.5", "train.steps=2",
                   "train.checkpoint_every=0"], out=str(tmp_path / "run"))
    start = [p.detach().clone() for p in tr.model.parameters()]
    tr.train(progress=False)
    ref = tr.ref_scorer.model
    assert all(torch.equal(a, b) for a, b in zip(start, ref.parameters()))          # frozen at the RL start
    assert any(not torch.equal(a, b) for a, b in zip(start, tr.model.parameters()))  # the policy moved
    assert not any(p.requires_grad for p in ref.parameters())
    # saved with the run; a resumed trainer gets the same reference
    assert os.listdir(tmp_path / "run" / "reference")
    tr2 = _trainer(["objective.kl_reference=ref", "objective.kl_coef=0.5", "train.steps=3",
                    "train.checkpoint_every=0"], out=str(tmp_path / "run"))
    tr2.resume()
    tr2.init_reference()
    assert all(torch.equal(a, b) for a, b in zip(start, tr2.ref_scorer.model.parameters()))
    # the step's KL is measured against the reference: at the first step (policy = reference) it is 0
    hist = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert abs(hist[0]["kl"]) < 1e-6 and hist[1]["kl"] > 0


def test_token_mean_does_not_depend_on_micro_batches():
    # token-mean normalises by the minibatch's tokens, so gradient accumulation over micro-batches must
    # give the update of one big micro-batch
    params = []
    for micro in (512, 3):
        tr = _trainer(["objective.loss_agg=token-mean", "objective.clip_delta=2.0", f"optim.micro_batch_rows={micro}",
                       "objective.level=token"])
        batch = _batch(tr)
        tr.update(batch, 1)
        params.append([p.detach().clone() for p in tr.model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_config_rules_for_the_options():
    from slim_rl.config import ConfigError, load_config

    for ov, msg in ((["objective.clip_delta=0.5"], "clip_delta must be 0 \\(off\\) or > 1"),
                    (["objective.coupled=true"], "coupled=true needs objective.name=random"),
                    (["objective.random_low=0.8", "objective.random_high=0.2"], "random_low"),
                    (["objective.loss_agg=mean"], "objective.loss_agg must be one of"),
                    (["objective.kl_reference=new"], "objective.kl_reference must be one of")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, ov)


def test_cli_compare_objectives(tmp_path):
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "slim_rl", "compare", "--quiet", "--out", str(out), "--objectives", "slim",
            "tracerl", "random", *TINY, "train.steps=1", f"train.out_dir={tmp_path / 'runs'}", "task.digits=1",
            "task.num_eval=8"]
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "compare.json").read_text())
    assert res["objectives"] == ["slim", "tracerl", "random"]
    assert set(res["summary"]) == {"slim", "tracerl", "random"}
    assert all(res["summary"][o]["mean_rollouts"] == 16 for o in res["objectives"])
    bad = subprocess.run(args[:5] + ["--objectives", "slim", "ppo"], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("slim-rl: error:") and "ppo" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
