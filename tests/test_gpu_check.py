"""benchmarks/gpu_check.sh and benchmarks/quick_gpu.py: the GPU evidence script runs its whole flow on the CPU
(--dry-run: tiny shapes, Triton interpreter, CUDA backend skipped with a reason), so it cannot rot between
the rare GPU runs; a wrong kernel is reported as incorrect; a stopped run still packs its evidence."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
OPS = ("tau_budget", "masked_logprob", "policy_loss", "attention")
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _env(out: Path) -> dict[str, str]:
    return {**os.environ, "OUT": str(out), "PYTHON": sys.executable}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    t0 = time.perf_counter()
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=_env(out), capture_output=True, text=True,
                       timeout=900)
    return p, out, time.perf_counter() - t0


def test_dry_run_exits_0_with_plan_and_at_most_4_files(dry_run):
    p, out, seconds = dry_run
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    m = re.search(r"stages 0-2 total: (\d+) s", p.stdout)
    assert m, p.stdout[:2000]
    assert int(m.group(1)) <= 7 * 60, f"time plan for stages 0-2 is {m.group(1)} s > 7 min"
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 4, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert {"summary.json", "gpu_check.log"} <= set(files)
    assert any(f.startswith("gpu_check_") and f.endswith(".tar.gz") for f in files)
    print(f"gpu_check.sh --dry-run: {seconds:.1f} s")


def _check_op_payload(op: str, payload: dict) -> None:
    for key in ("device", "git_sha", "torch", "triton"):
        assert payload.get(key), f"{op}: {key} missing"
    cases = payload["cases"]
    assert cases, f"{op}: no cases"
    for c in cases:
        assert c["correct"] is True, f"{op}: {c['name']} not correct: {c.get('error') or c.get('checks')}"
        assert isinstance(c["rel_err"], float) and math.isfinite(c["rel_err"]), c
        assert isinstance(c["ms"], float) and c["ms"] > 0, c
        assert isinstance(c["baselines"], dict) and c["baselines"], f"{op}: {c['name']} has no baselines"
        assert all(isinstance(v, float) for k, v in c["baselines"].items() if not k.endswith("_mib")), c
        assert c["checks"], c
    for s in payload["skipped"]:
        assert s["reason"], s


def test_dry_run_summary_has_every_op_with_correct_cases(dry_run):
    p, out, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert summary["time_plan_s"]["stages_0_2"] <= 420
    assert [s["stage"] for s in summary["stages"]] == [0, 1, 2]
    assert all(s["status"] == "ok" for s in summary["stages"]), json.dumps(summary["stages"], indent=1)
    assert summary["cuda_backend"]["built"] is False and summary["cuda_backend"]["reason"]
    for op in OPS:
        _check_op_payload(op, summary["ops"][op])
    # every kernel is exercised: the decode step (greedy and sampled), log-probs, loss levels, both layouts
    names = " | ".join(c["name"] for op in OPS for c in summary["ops"][op]["cases"])
    for needle in ("tau_budget_step triton", "T=0", "T=1", "logprob_from_logits fwd ", "logprob_from_logits fwd+bwd",
                   "masked_logprob fwd+bwd triton", "level=sequence", "level=block", "level=token",
                   "train layout triton fwd", "train layout triton fwd+bwd", "decode layout"):
        assert needle in names, needle
    cuda_skips = [s for op in OPS for s in summary["ops"][op]["skipped"] if " cuda" in s["name"]]
    assert cuda_skips, "the cuda cases must be listed as skipped with a reason on the CPU"
    assert summary["tests"]["failed"] == 0 and summary["tests"]["errors"] == 0
    # the archive holds one JSON per op folder, named after it, with the same payload
    (archive,) = out.glob("gpu_check_*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        for op in OPS:
            (member,) = [n for n in names if re.search(rf"/{op}_[a-z0-9-]+\.json$", n)]
            _check_op_payload(op, json.load(tar.extractfile(member)))
        assert any(n.endswith("/summary.json") for n in names)
        assert any(n.endswith("/logs/quick_attention.log") for n in names)


def test_rel_err_nan_never_passes():
    from benchmarks.quick_gpu import Check, rel_err

    ref = torch.tensor([1.0, -2.0, 3.0, float("nan")])
    assert rel_err(ref.clone(), ref) == 0.0
    assert rel_err(torch.tensor([1.0, -2.0, float("nan"), float("nan")]), ref) == math.inf
    assert rel_err(torch.tensor([1.0, -2.0, 3.0, 0.0]), ref) == math.inf  # NaN expected, a number written
    assert rel_err(torch.tensor([1.0, float("inf"), 3.0, float("nan")]), ref) == math.inf
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_err(torch.ones(3), torch.zeros(3)) == math.inf
    assert rel_err(torch.ones(2), torch.ones(3)) == math.inf
    chk = Check()
    chk.close("nan", torch.full((4,), float("nan")), torch.ones(4), torch.bfloat16)
    chk.close("ok", torch.ones(4) * 1.001, torch.ones(4), torch.bfloat16)
    case = chk.fill({"name": "x"})
    assert case["correct"] is False and case["checks"]["nan"]["ok"] is False and case["checks"]["ok"]["ok"] is True
    assert chk.fill({"name": "y"}, ["ok"])["correct"] is True
    assert Check().fill({"name": "empty"})["correct"] is False  # a case that checked nothing is not correct


@pytest.mark.skipif(not INTERPRETER, reason="runs the Triton kernels on the CPU through the interpreter")
def test_quick_check_reports_a_wrong_kernel(monkeypatch, tmp_path):
    import benchmarks.quick_gpu as q

    real = q.slim_ops.slim_policy_loss

    def off_by_one_percent(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * 1.01, metrics

    monkeypatch.setattr(q.slim_ops, "slim_policy_loss", off_by_one_percent)
    rc = q.main(q.parse_args(["--dry-run", "--out", str(tmp_path), "--only", "policy_loss"]))
    assert rc == 1
    (path,) = tmp_path.glob("policy_loss_*.json")
    cases = json.loads(path.read_text())["cases"]
    assert len(cases) == 3
    for c in cases:
        assert c["correct"] is False and c["checks"]["loss"]["ok"] is False, c
        assert c["checks"]["dlogp"]["ok"] is False  # the gradient of the scaled loss is off too


def test_stopped_run_still_packs_what_ran(tmp_path):
    """SIGTERM in the middle of stage 1: the trap packs the cases that finished; nothing is left running."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    p = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", "--stages", "1"], cwd=ROOT,
                         env={**_env(out), "TMPDIR": str(work)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.5)
        partial = list(work.glob("gpu_check.*/*/tau_budget_cpu.json"))
        if any(json.loads(f.read_text() or "{}").get("cases") for f in partial if f.stat().st_size):
            break
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 143, stdout[-4000:]
    files = sorted(f.name for f in out.iterdir())
    assert len(files) == 3, files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 143
    assert summary["ops"]["tau_budget"]["cases"], "the finished cases must come back"
    assert "signal received" in (out / "gpu_check.log").read_text()
    assert not list(work.iterdir()), "the work folder is removed once packed"
