"""Every Triton kernel configuration compiles for sm_90a on the CPU; every .cu compiles with nvcc
for compute_90a,sm_90a. Registers and spills go into the end-of-run report; hot kernels may not spill."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from slim_ops._aot import format_report


def _run_aot(what: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "slim_ops._aot", what, "--json"], capture_output=True,
                       text=True, env=env, timeout=1200)
    assert p.returncode == 0, f"AOT compile driver failed:\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_triton_kernels_compile_for_sm90a(report):
    pytest.importorskip("triton")
    recs = _run_aot("triton")["triton"]
    report(format_report(recs, []))
    assert recs, "no Triton kernel declared AOT_SPECS"
    errors = [f"{r['kernel']} {r['label']}: {r['error']}" for r in recs if not r["ok"]]
    assert not errors, "Triton compile errors:\n" + "\n".join(errors)
    spills = [f"{r['kernel']} {r['label']}: local={r['local']} stack={r['stack']}"
              for r in recs if r["hot"] and (r["local"] or r["stack"])]
    assert not spills, "hot Triton kernels spill:\n" + "\n".join(spills)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc not installed")
def test_cuda_sources_compile_for_sm90a(report):
    recs = _run_aot("cuda")["cuda"]
    report(format_report([], recs))
    assert recs, "csrc/sources.txt lists no .cu file"
    errors = [f"{r['source']}:\n{r['error']}" for r in recs if not r["ok"]]
    assert not errors, "nvcc errors:\n" + "\n".join(errors)
    spills = [f"{f['name']}: {f.get('spill_stores')} B spill stores" for r in recs for f in r["functions"]
              if f.get("spill_stores") or f.get("spill_loads")]
    assert not spills, "CUDA kernels spill:\n" + "\n".join(spills)
