"""The trainer's command line as a user meets it (subprocess ``python -m slim_rl ...``, tiny configs):
bad values fail fast with one line and exit code 2, run folders never lose work, ``--resume`` needs a
loadable checkpoint, ``eval`` of a finished run equals its summary, ``export`` gives a Hugging Face
folder, and a diverging run stops without ever writing a non-finite weight."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
       "OMP_NUM_THREADS": "1"}
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "sft.steps=2", "sft.batch_size=16", "rollout.prompts_per_step=4", "rollout.group_size=4",
        "task.num_eval=16", "eval.every=0", "train.tensorboard=false", "advantage.filter_groups=false",
        "optim.micro_batch_rows=7"]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "slim_rl", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("slim-rl: error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


def _snapshot(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("args,msg", [
    (["train", "rollout.tau=1.5"], "rollout.tau must be > 0.0 and < 1.0, got 1.5"),
    (["train", "sft.warmup_steps=-5"], "sft.warmup_steps must be >= 0, got -5"),
    (["train", "train.steps=-5"], "train.steps must be >= 0, got -5"),
    (["train", "train.checkpoint_every=-1"], "train.checkpoint_every must be >= 0"),
    (["train", "train.keep_checkpoints=-3"], "train.keep_checkpoints must be >= 0"),
    (["train", "dist.backend=foo"], "dist.backend must be one of auto|gloo|nccl, got 'foo'"),
    (["train", "sft.batch_size=0"], "sft.batch_size must be >= 1, got 0"),
    (["train", "objective.kl_coef=nan"], "objective.kl_coef must be a finite number, got nan"),
    (["demo", "optim.lrr=1"], "unknown key 'lrr'"),
    (["train", "--config", "no/such/config.yaml"], "config file 'no/such/config.yaml' does not exist"),
    (["train", "--resume"], "--resume: no checkpoint to resume in"),
    (["eval"], "eval: the run folder"),
    (["export", "--to", "x"], "export: the run folder"),
    (["train", "model.path=no/such/model"], "model.path 'no/such/model' is not a checkpoint directory"),
    (["trian"], "invalid choice: 'trian'"),
])
def test_a_bad_value_fails_fast_in_one_line(tmp_path, args, msg):
    out = tmp_path / "run"
    cmd = args if args[0] == "trian" else [args[0], "--out", str(out), *args[1:]]
    t0 = time.time()
    r = _cli(*cmd)
    elapsed = time.time() - t0
    assert msg in _one_line_error(r)
    assert elapsed < 5.0, f"{elapsed:.1f} s"
    assert not out.exists()                       # nothing was written


def test_a_checkpoint_whose_vocabulary_does_not_fit_the_task(tmp_path):
    from slim_rl import models

    path = tmp_path / "big_vocab"
    models.tiny("sdar", vocab_size=32, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1).save_pretrained(path)
    r = _cli("train", "--out", str(tmp_path / "run"), f"model.path={path}")
    assert "does not fit task.name=addition: its vocab_size is 32, the task's vocabulary needs 16" in \
        _one_line_error(r)
    assert not (tmp_path / "run").exists()


def test_config_prints_every_key():
    from slim_rl.config import Config, to_dict

    r = _cli("config")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout) == to_dict(Config())
    assert "max_skipped_updates: 3" in r.stdout and "# int >= 1: stop after" in r.stdout


def test_run_folders_never_lose_work(tmp_path):
    run = str(tmp_path / "run")
    # a finished run: the last step (3) is saved although checkpoint_every=2
    a = _cli("train", "--quiet", "--out", run, *TINY, "train.steps=3", "train.checkpoint_every=2")
    assert a.returncode == 0, a.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    cks = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert cks == ["step_00000002", "step_00000003"]  # keep_checkpoints=2 (step 0 = SFT pruned)
    # eval of the finished run (its own config.yaml, no overrides repeated) = the summary's accuracy_after
    e = _cli("eval", "--out", run)
    assert e.returncode == 0, e.stderr[-3000:]
    res = json.loads(e.stdout)
    assert res["checkpoint"].endswith("step_00000003")
    assert res["accuracy"] == summary["accuracy_after"] and res["num_prompts"] == 16
    # export: one Hugging Face folder that slim_rl.models.load and transformers read
    hf = str(tmp_path / "hf")
    x = _cli("export", "--out", run, "--to", hf)
    assert x.returncode == 0, x.stderr[-3000:]
    import transformers

    from slim_rl import models

    m = models.load(hf, "sdar")
    assert (m.mask_id, m.eos_id, m.pad_id) == (15, 14, 13)
    assert transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).config.vocab_size == 16

    before = _snapshot(run)
    # a new run into the folder refuses to start ...
    msg = _one_line_error(_cli("train", "--out", run, *TINY))
    assert "holds an earlier run" in msg and "--resume" in msg and "--overwrite" in msg
    # ... and with --overwrite a failing one (bad value; killed during SFT) leaves every file untouched
    _one_line_error(_cli("train", "--out", run, "--overwrite", *TINY, "rollout.tau=1.5"))
    p = subprocess.Popen([sys.executable, "-m", "slim_rl", "train", "--quiet", "--out", run, "--overwrite", *TINY,
                          "sft.steps=100000"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)
    assert p.poll() is None, "the SFT stage should still be running"
    p.kill()
    p.wait()
    assert _snapshot(run) == before

    # --resume: a damaged newest checkpoint falls back to the one before; a stale temp dir is removed
    _flip_byte(os.path.join(run, "checkpoints", "step_00000003", "__0_0.distcp"))
    os.makedirs(os.path.join(run, "checkpoints", "step_00000007.tmp"))
    r = _cli("train", "--quiet", "--out", run, "--resume", *TINY, "train.steps=4", "train.checkpoint_every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000003" in r.stdout + r.stderr and "trying an older checkpoint" in r.stdout + r.stderr
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    # the damaged step 3 (an abandoned future) went when the resumed run saved its own checkpoint
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000002", "step_00000004"]
    # every checkpoint damaged: --resume fails clearly and deletes nothing
    for n in ("step_00000002", "step_00000004"):
        _flip_byte(os.path.join(run, "checkpoints", n, "__0_0.distcp"))
    damaged = _snapshot(run)
    msg = _one_line_error(_cli("train", "--out", run, "--resume", *TINY, "train.steps=6"))
    assert "no loadable checkpoint" in msg
    assert _snapshot(run) == damaged
    # --overwrite that succeeds replaces the earlier run
    o = _cli("train", "--quiet", "--out", run, "--overwrite", *TINY, "train.steps=1")
    assert o.returncode == 0, o.stderr[-3000:]
    assert [m["step"] for m in _metrics(run)] == [1]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000000", "step_00000001"]


def test_diverging_run_stops_and_never_writes_a_non_finite_weight(tmp_path):
    """A huge learning rate blows the weights up after the first update: every later update has a
    non-finite loss, is skipped and counted; after train.max_skipped_updates in a row the run stops with
    one line (exit 1). Every checkpoint written holds finite weights."""
    from slim_rl import checkpoint as C
    from slim_rl.config import load_config
    from slim_rl.trainer import build_model

    run = str(tmp_path / "run")
    # a model SFT-trained just enough that some rollouts are rewarded (non-zero advantages)
    ov = ["model.hidden_size=64", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
          "task.digits=1", "task.num_eval=20", "task.demo_error=0.3", "sft.steps=300", "sft.batch_size=32",
          "sft.warmup_steps=5", "rollout.prompts_per_step=4", "rollout.group_size=4", "eval.every=0",
          "train.tensorboard=false", "advantage.filter_groups=false", "optim.minibatches=2",
          "optim.micro_batch_rows=7", "optim.lr=1e30", "train.steps=6", "train.checkpoint_every=1",
          "train.max_skipped_updates=2"]
    r = _cli("train", "--quiet", "--out", run, *ov)
    msg = _one_line_error(r, code=1)
    assert "non-finite loss or gradient norm" in msg
    recs = _metrics(run)
    assert recs[0]["reward"] > 0 and sum(m["skipped_updates"] for m in recs) >= 2
    assert recs[-1]["skipped_updates_total"] == sum(m["skipped_updates"] for m in recs)
    cfg = load_config(os.path.join(run, "config.yaml"))
    cks = C.list_checkpoints(os.path.join(run, "checkpoints"))
    assert cks
    for ck in cks:
        model = build_model(cfg)
        C.load_weights(ck, model)
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), (ck, name)



def test_overrides_may_sit_between_options(tmp_path):
    """``section.key=value`` overrides before, between and after options all apply, later ones win; an unknown
    option is still a one-line error."""
    from slim_rl.cli import _parse

    out = str(tmp_path / "x")
    r = _cli("config", "optim.lr=0.0003", "--out", out, "train.steps=7", "--config", "configs/demo.yaml",
             "train.steps=9", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load(r.stdout)
    assert cfg["optim"]["lr"] == 0.0003 and cfg["train"]["steps"] == 9 and cfg["train"]["out_dir"] == out
    args = _parse(["train", "a.b=1", "--out", "X", "c.d=2", "--quiet", "e.f=3"])
    assert (args.cmd, args.out, args.quiet, args.overrides) == ("train", "X", True, ["a.b=1", "c.d=2", "e.f=3"])
    args = _parse(["compare", "a=1", "--objectives", "slim", "b=2", "--out", "X", "c=3"])
    assert args.objectives == ["slim"] and args.overrides == ["a=1", "b=2", "c=3"]
    assert "unrecognized arguments: --bogus" in _one_line_error(_cli("train", "a.b=1", "--bogus", timeout=120))
