"""benchmarks/bench_rl_step.py on its small preset: the slim_ops path (the trainer's rollout and update) and
the plain-PyTorch reference path agree (greedy tokens, rows, old log-probs, loss, gradients) before anything
is timed, and the result file records the machine's load."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_slim_and_reference_paths_agree(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")])}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_rl_step.py"), "--preset", "tiny",
                        "--paths", "slim", "reference", "ref+logprob", "--threads", "1", "--out", str(tmp_path),
                        "--allow-loaded"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "rl_step_cpu_*.json"))
    res = json.loads(open(path).read())
    a = res["agreement"]
    assert a["agree"] and a["tokens_identical"] and a["rows_identical"], a
    assert a["grad_rel_l2_err"] <= 1e-3 and a["logp_old_max_abs_err"] <= 5e-4
    for name in ("slim", "reference", "ref+logprob"):
        rec = res["results"][name]
        assert rec["generated_tokens"] > 0 and rec["trained_tokens"] > 0 and rec["update_peak"] > 0
    assert res["results"]["slim"]["nfe"] == res["results"]["reference"]["nfe"]
    for k in ("load_before", "load_after"):
        assert {"loadavg_1m", "busy_processes", "quiet"} <= set(res[k])
