"""Multi-process training: ``torchrun --nproc_per_node=2`` on CPU (gloo) runs the trainer, and two processes
take the same loss and update as one process for the same global batch, both with
``DistributedDataParallel`` (``dist.strategy=ddp``) and with FSDP2 sharding (``dist.strategy=fsdp``); no
``[n, V]`` logits tensor is allocated in a training step under either; and a ``torchrun ... -m slim_rl
train`` FSDP2 run killed mid-run and resumed reproduces the uninterrupted run's metrics.

The first test launches this file under torchrun in worker mode (``python test_distributed.py OUT ...``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

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


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op produces. slim_ops custom ops are run through their
    Python implementations with the recorder active, so their own allocations are seen too (a custom op
    is otherwise opaque to dispatch modes); the rows each ``masked_logprob`` call scores are noted."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.logprob_rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "slim_ops":
            if "masked_logprob" in str(func) and "bwd" not in str(func):
                self.logprob_rows.append(int(args[0].shape[0]))
            with self:
                out = _maybe_get_opdef(func)._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out

    def full_vocab(self, V: int, d: int) -> list[tuple[str, tuple[int, ...]]]:
        """Tensors with a vocabulary-sized dimension bigger than the [V, d] head itself: [n, V] logits
        (or any [n, V] temporary) with n > d rows."""
        return [(op, sh) for op, sh in self.shapes if V in sh and torch.Size(sh).numel() > V * d]


ALLOC_V, ALLOC_D = 640, 32
TILE = 1 << 12


def alloc_setup(extra=()):
    """A trainer with a vocabulary large enough that [n, V] stands out (V=640 > d=32, n > d rows per
    micro-batch) and a fixed batch. Callers cut the masked log-prob op's tile to 256 vocabulary columns
    (``TILE``), so that a whole-vocabulary tile would show too."""
    from slim_rl.config import load_config
    from slim_rl.trainer import RolloutBatch, Trainer

    cfg = load_config(None, TINY + ["task.name=jsonl", "task.path=unused", "task.tokenizer=unused",
                                    f"model.vocab_size={ALLOC_V}", f"model.hidden_size={ALLOC_D}",
                                    "optim.micro_batch_rows=48", "objective.name=slim", "train.out_dir=/unused",
                                    *extra])
    tr = Trainer(cfg, task=object())
    g = torch.Generator().manual_seed(7)
    n, L1 = 8, 16
    lens = torch.randint(8, L1 + 1, (n,), generator=g)
    ids = torch.randint(0, ALLOC_V - 3, (n, L1), generator=g)
    ids[torch.arange(n), lens - 1] = tr.eos_id
    ids = torch.where(torch.arange(L1)[None] < lens[:, None], ids, tr.pad_id)
    prompts = [[int(x) for x in torch.randint(0, ALLOC_V - 3, (5,), generator=g)] for _ in range(n)]
    batch = RolloutBatch(prompts, torch.arange(4).repeat_interleave(2), ids, lens,
                         torch.zeros(n, L1, dtype=torch.int64), torch.tensor([1., 0] * 4))
    return tr, batch


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
    hist = tr.train()                     # ... and saves its last step (sharded, every rank its part)
    # exact resume in one process: a new trainer loading that checkpoint holds the same weights and
    # optimizer state, and its next update equals the original trainer's
    tr2 = Trainer(cfg)
    tr2.resume()

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()

    same_state = tr2.step == 3 and all(
        torch.equal(full(p), full(q)) and all(torch.equal(full(tr.optimizer.state[p][k]), full(v))
                                              for k, v in tr2.optimizer.state[q].items())
        for p, q in zip(tr.model.parameters(), tr2.model.parameters()))
    r1, r2 = tr.update(batch, 9), tr2.update(batch, 9)
    same_next = r1 == r2 and all(torch.equal(full(p), full(q))
                                 for p, q in zip(tr.model.parameters(), tr2.model.parameters()))
    # no [n, V] tensor in a training step (logp_old pass + update) of this strategy
    from slim_ops.ops.masked_logprob import op as lp_op

    lp_op.TORCH_TILE_ELEMS = TILE
    atr, abatch = alloc_setup([f"dist.strategy={strategy}"])
    with AllocationRecorder() as recorder:
        arec = atr.update(abatch, 1)
    if tr.info.rank == 0:
        torch.save({"rec": rec, "params": params, "world": tr.info.world, "steps": [r["step"] for r in hist],
                    "rollouts": hist[-1]["rollouts"], "alloc_full_vocab": recorder.full_vocab(ALLOC_V, ALLOC_D),
                    "alloc_rows": recorder.logprob_rows, "alloc_rec": arec,
                    "alloc_head": type(atr.scorer).__name__, "same_state": same_state, "same_next": same_next,
                    "n_optim_state": len(tr2.optimizer.state)}, out)
    info = tr.info
    del tr, tr2, atr                      # the wrapped models (and their reducers) go before the group does
    D.barrier(info)
    D.shutdown(info)


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
    # a checkpoint (written by every rank) restores weights and optimizer state exactly
    for res in (one, two):
        assert res["same_state"] and res["same_next"] and res["n_optim_state"] > 0
    # no [n, V] logits in a training step: the head weight reaches masked_logprob whole (DDP: replicated;
    # FSDP2: gathered by the root unit) and every call scores more rows than the hidden size
    for res, wrapper in ((one, "Scorer"), (two, "DistributedDataParallel" if strategy == "ddp" else "FSDPScorer")):
        assert res["alloc_head"] == wrapper
        assert res["alloc_full_vocab"] == [], res["alloc_full_vocab"][:5]
        assert res["alloc_rows"] and max(res["alloc_rows"]) > ALLOC_D, res["alloc_rows"]
        assert res["alloc_rec"]["rows"] == 24 and res["alloc_rec"]["grad_norm"] > 0


def test_the_allocation_check_sees_full_logits(monkeypatch):
    """The recorder flags a [n, V] tensor when one is made (so the distributed check can fail)."""
    from slim_ops.ops.masked_logprob import op as lp_op

    monkeypatch.setattr(lp_op, "TORCH_TILE_ELEMS", TILE)
    tr, batch = alloc_setup()
    hs = torch.randn(ALLOC_D + 8, ALLOC_D)
    with AllocationRecorder() as recorder:
        tr.model.get_output_embeddings()(hs)
    assert recorder.full_vocab(ALLOC_V, ALLOC_D)
    with AllocationRecorder() as recorder:                         # one process: the plain path is clean
        rec = tr.update(batch, 1)
    assert recorder.full_vocab(ALLOC_V, ALLOC_D) == [] and max(recorder.logprob_rows) > ALLOC_D
    assert rec["rows"] == 24


# ---------------------------------------------------------------- torchrun -m slim_rl train: kill + resume
CLI_TINY = ["task.digits=1", "task.num_eval=20", "rollout.prompts_per_step=8", "rollout.group_size=4",
            "eval.every=0", "train.tensorboard=false", "advantage.filter_groups=false", "optim.epochs=2",
            "optim.minibatches=2", "optim.micro_batch_rows=8", "sft.steps=0", "train.keep_checkpoints=0"]
_VOLATILE = {"rollout_s", "step_s"}


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_fsdp_torchrun_kill_and_resume_equals_uninterrupted(tmp_path):
    """``torchrun --nproc_per_node=2 -m slim_rl train --config configs/demo.yaml dist.strategy=fsdp
    train.checkpoint_every=1``: every rank writes its shard of every checkpoint; a run SIGKILLed from
    outside after its first RL checkpoint and resumed with ``--resume`` gives exactly the uninterrupted
    run's metrics and weights. The start model is a short SFT of the demo task, exported (so rollouts
    earn some reward and every RL step really moves the weights)."""
    from slim_rl import checkpoint as C
    from slim_rl.config import load_config
    from slim_rl.trainer import build_model

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
           "OMP_NUM_THREADS": "1"}
    sft = str(tmp_path / "sft")
    size = ["model.hidden_size=64", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1"]
    r = subprocess.run([sys.executable, "-m", "slim_rl", "train", "--quiet", "--out", sft, *size, *CLI_TINY,
                        "sft.steps=300", "sft.batch_size=32", "sft.warmup_steps=5", "task.demo_error=0.3",
                        "train.steps=0"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    start = str(tmp_path / "start")
    r = subprocess.run([sys.executable, "-m", "slim_rl", "export", "--out", sft, "--to", start], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = 5
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slim_rl",
           "train", "--quiet", "--config", "configs/demo.yaml", "dist.strategy=fsdp", "train.checkpoint_every=1",
           *CLI_TINY, f"model.path={start}", f"train.steps={steps}"]
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    r = subprocess.run(cmd + ["--out", a], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    # B: killed from outside (the whole torchrun process group) once checkpoint 1 is committed
    p = subprocess.Popen(cmd + ["--out", b], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=ROOT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        ck = C.latest_checkpoint(os.path.join(b, "checkpoints"))
        if ck is not None and C.checkpoint_step(ck) >= 1:
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.returncode
    assert not os.path.exists(os.path.join(b, "summary.json"))
    done = len(_records(os.path.join(b, "metrics.jsonl")))
    assert 1 <= done < steps
    ck1 = os.path.join(b, "checkpoints", "step_00000001")
    assert {"__0_0.distcp", "__1_0.distcp", "rng_0.pt", "rng_1.pt", "manifest.json"} <= set(os.listdir(ck1))
    r = subprocess.run(cmd + ["--out", b, "--resume"], env=env, capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ra, rb = _records(os.path.join(a, "metrics.jsonl")), _records(os.path.join(b, "metrics.jsonl"))
    assert [x["step"] for x in ra] == list(range(1, steps + 1)) == [x["step"] for x in rb]
    resumed = json.loads(open(os.path.join(b, "summary.json")).read())["resumed_from"]
    for x, y in zip(ra, rb):
        for k in x:
            if k in _VOLATILE:
                continue
            if isinstance(x[k], int) or k in ("reward", "response_len", "mask_ratio", "mean_abs_advantage"):
                assert x[k] == y[k], (x["step"], k, x[k], y[k], done, resumed)   # same rollouts and rows
            else:
                # bit-identical in nearly every run; two separately started process groups may round a
                # CPU reduction differently (~1e-7), which AdamW can amplify in near-zero-gradient weights
                assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-7), (x["step"], k, x[k], y[k], done, resumed)
    assert any(x.get("grad_norm", 0.0) > 0 for x in ra) and any(x["reward"] > 0 for x in ra)
    # the final weights too (loaded from the sharded checkpoints by one process)
    cfg = load_config(os.path.join(a, "config.yaml"))
    wa, wb, w0 = build_model(cfg), build_model(cfg), build_model(cfg)
    C.load_weights(os.path.join(a, "checkpoints", f"step_{steps:08d}"), wa)
    C.load_weights(os.path.join(b, "checkpoints", f"step_{steps:08d}"), wb)
    moved = max((x - z).abs().max().item() for x, z in zip(wa.parameters(), w0.parameters()))
    apart = max((x - y).abs().max().item() for x, y in zip(wa.parameters(), wb.parameters()))
    assert moved > 0 and apart <= 0.25 * moved, (apart, moved)   # (bit-identical in nearly every run)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3])


def _worker_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of the workers a torchrun process (``parent``) started."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{d}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if b"RANK" in env:
                out[int(env[b"RANK"])] = int(d)
        except (OSError, ValueError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stalled_rank_ends_the_run_within_the_timeout(tmp_path):
    """``torchrun --nproc_per_node=2 -m slim_rl train dist.timeout_s=10``: rank 0 is stopped (SIGSTOP) mid-run;
    rank 1 leaves within dist.timeout_s + 30 s with exit code 1 and one line naming its rank and the phase, and
    torchrun ends the run (exit code 1) instead of waiting forever."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
           "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": ""}
    out, err = str(tmp_path / "run"), str(tmp_path / "stderr.txt")
    timeout_s = 10
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slim_rl",
           "train", "--quiet", "--config", "configs/demo.yaml", "--out", out, *CLI_TINY,
           "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
           "train.steps=100000", "train.checkpoint_every=0", f"dist.timeout_s={timeout_s}"]
    with open(err, "w") as ef:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=ef, cwd=ROOT, start_new_session=True)
    try:
        metrics = os.path.join(out, "metrics.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not (
                os.path.exists(metrics) and len(_records(metrics)) >= 2):
            time.sleep(0.5)
        assert p.poll() is None, open(err).read()[-3000:]
        pids = _worker_pids(p.pid)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[0], signal.SIGSTOP)
        t_stop = time.time()
        while _alive(pids[1]) and time.time() - t_stop < timeout_s + 60:
            time.sleep(0.2)
        t_rank1 = time.time() - t_stop
        rc = p.wait(timeout=timeout_s + 120)
        text = open(err).read()
        lines = [ln for ln in text.splitlines() if ln.startswith("slim-rl: error:")]
        assert t_rank1 <= timeout_s + 30, (t_rank1, text[-3000:])
        assert rc == 1, text[-3000:]
        assert len(lines) == 1, text[-3000:]
        assert "rank 1 of 2: RL step" in lines[0] and f"dist.timeout_s={timeout_s}" in lines[0], lines[0]
        assert "slim_rl/" not in text.replace(lines[0], ""), text[-3000:]  # no worker traceback (torchrun's own
        print(lines[0])                                                      # report of the failed child stays)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in _worker_pids(p.pid).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=30)


def test_peer_failure_tells_lost_peers_from_own_errors():
    from slim_rl import distributed as D

    assert D.peer_failure(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for "
                                       "recv operation to complete"))
    assert D.peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]"))
    if hasattr(torch.distributed, "DistError"):
        assert D.peer_failure(torch.distributed.DistError("watchdog"))
    assert not D.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not D.peer_failure(ValueError("timed out"))
