"""Multi-process training (issue 6, acceptance 4): ``torchrun --nproc_per_node=2`` on CPU (gloo) runs the
trainer, and two processes take the same loss and update as one process for the same global batch, both
with data parallelism (``dist.strategy=ddp``) and with FSDP2 sharding (``dist.strategy=fsdp``).

The test launches this file under torchrun in worker mode (``python test_distributed.py OUT``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "sft.steps=0", "rollout.prompts_per_step=5", "rollout.group_size=3", "task.num_eval=10",
        "eval.every=0", "train.tensorboard=false", "train.threads=1", "train.progress=false",
        "advantage.filter_groups=false", "optim.epochs=2", "optim.minibatches=2", "optim.micro_batch_rows=4",
        "optim.lr=1e-3", "train.checkpoint_every=0"]


def _fixed_batch(pad_id: int, eos_id: int):
    """A deterministic global batch: 5 prompts × 3 responses of different lengths, mixed rewards."""
    from slim_rl.trainer import RolloutBatch

    g = torch.Generator().manual_seed(123)
    n, L1 = 15, 6
    lens = torch.randint(1, L1 + 1, (n,), generator=g)
    ids = torch.randint(0, 10, (n, L1), generator=g)
    ids[torch.arange(n), lens - 1] = eos_id
    pos = torch.arange(L1)[None]
    ids = torch.where(pos < lens[:, None], ids, pad_id)
    smap = torch.where(pos < lens[:, None], torch.randint(0, 4, (n, L1), generator=g), -1)
    prompts = [[int(x) for x in torch.randint(0, 10, (int(k),), generator=g)] for k in
               torch.randint(2, 6, (5,), generator=g).repeat_interleave(3)]
    rewards = torch.tensor([1., 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0])
    return RolloutBatch(prompts, torch.arange(5).repeat_interleave(3), ids, lens, smap, rewards)


def worker(out: str, objective: str, strategy: str) -> None:
    from slim_rl import distributed as D
    from slim_rl.config import load_config
    from slim_rl.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(None, TINY + [f"objective.name={objective}", f"dist.strategy={strategy}",
                                    f"train.out_dir={out}_run"])
    tr = Trainer(cfg)
    batch = _fixed_batch(tr.pad_id, tr.eos_id)
    rec = tr.update(batch, 1)
    # FSDP2 parameters are DTensor shards: compare the full tensors
    params = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                        for p in tr.model.parameters()])
    # and the full loop (rollouts split over ranks and gathered) runs under torchrun
    tr.cfg.train.steps = 3
    hist = tr.train()
    if tr.info.rank == 0:
        torch.save({"rec": rec, "params": params, "world": tr.info.world, "steps": [r["step"] for r in hist],
                    "rollouts": hist[-1]["rollouts"]}, out)
    D.barrier(tr.info)
    D.shutdown(tr.info)


def _torchrun(n: int, out: str, objective: str, strategy: str = "ddp") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        os.path.abspath(__file__), out, objective, strategy],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("objective,strategy", [("slim", "ddp"), ("tracerl", "fsdp")])
def test_two_processes_equal_one(tmp_path, objective, strategy):
    one = _torchrun(1, str(tmp_path / "one.pt"), objective)
    two = _torchrun(2, str(tmp_path / "two.pt"), objective, strategy)
    assert one["world"] == 1 and two["world"] == 2
    for k in ("rows", "kept_responses", "num_groups"):
        assert one["rec"][k] == two["rec"][k]
    for k in ("loss", "policy_loss", "kl", "grad_norm", "clip_frac"):
        assert two["rec"][k] == pytest.approx(one["rec"][k], rel=1e-5, abs=1e-7), k
    diff = (one["params"] - two["params"]).abs().max().item()
    assert diff < 1e-6, f"parameters after the update differ by {diff}"
    # the update did something (epoch 2 sees a non-zero KL, the weights moved from their init)
    assert one["rec"]["kl"] > 0
    # the trainer loop ran under torchrun with the global rollout budget
    assert two["steps"] == [1, 2, 3] and two["rollouts"] == 3 * 5 * 3


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3])
