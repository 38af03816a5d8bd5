"""Every Triton kernel configuration compiles for sm_90a on the CPU with the specialisation a real launch
gets (slim_ops/_aot.py); every .cu compiles with nvcc for compute_90a,sm_90a. The compiled code must
have: no spills anywhere, wgmma N >= 32 in the attention and masked_logprob matrix kernels, and
asynchronous loads (cp.async / TMA) in the loop of every streaming kernel. The table (registers,
spills, dynamic shared memory, wgmma shapes, loop loads) goes into the end-of-run report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from slim_ops._aot import AotSpec, analyse_ptx, format_report, launch_specialisation, spills

# kernels whose bf16/fp16 configurations run their matrix products on tensor cores
MMA_KERNELS = {
    "slim_ops.ops.attention.triton": {"_bda_fwd_kernel", "_bda_bwd_dkdv_kernel", "_bda_bwd_dq_kernel",
                                      "_bda_decode_kernel"},
    "slim_ops.ops.masked_logprob.triton": {"_masked_logprob_fwd_kernel", "_masked_logprob_bwd_kernel"},
}
# kernels that stream a row of logits through a loop: their AOT specs must be marked streaming
STREAMING_KERNELS = {"_tau_budget_confidence_kernel", "_logprob_from_logits_fwd_kernel",
                     "_logprob_from_logits_bwd_kernel"}


def _run_aot(what: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "slim_ops._aot", what, "--json"], capture_output=True,
                       text=True, env=env, timeout=1800)
    assert p.returncode == 0, f"AOT compile driver failed:\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def triton_aot():
    """One compile of every configuration per test session (the driver compiles in parallel processes)."""
    pytest.importorskip("triton")
    return _run_aot("triton")


@pytest.fixture
def triton_recs(triton_aot):
    recs = triton_aot["triton"]
    assert recs, "no Triton kernel declared AOT_SPECS"
    errors = [f"{r['kernel']} {r['label']}: {r['error']}" for r in recs if not r["ok"]]
    assert not errors, "Triton compile errors:\n" + "\n".join(errors)
    return recs


def _name(r: dict) -> str:
    return f"{r['kernel']} [{r['label']}]"


def test_triton_kernels_compile_without_spills(triton_aot, triton_recs, report):
    report(format_report(triton_recs, []) + f"\n({len(triton_recs)} Triton configurations compiled in "
                                            f"{triton_aot['seconds']} s)")
    bad = [f"{_name(r)}: local={r['local']} stack={r['stack']}" for r in triton_recs if spills(r)]
    assert not bad, "Triton kernels spill:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MMA_KERNELS))
def test_matrix_kernels_use_wgmma_n32(triton_recs, module):
    recs = [r for r in triton_recs if r["module"] == module]
    assert recs, f"{module} declares no AOT_SPECS"
    bad = []
    for r in recs:
        tensor_core = r["kernel"] in MMA_KERNELS[module] and "fp32" not in r["label"]
        if tensor_core and not r["wgmma"]:
            bad.append(f"{_name(r)}: no wgmma (mma.sync: {r['mma_sync']})")
        elif r["mma_sync"]:
            bad.append(f"{_name(r)}: mma.sync {r['mma_sync']} instead of wgmma")
        elif r["wgmma"] and r["wgmma_n_min"] < 32:
            bad.append(f"{_name(r)}: {r['wgmma']}")
    assert not bad, "matrix products below wgmma m64n32:\n" + "\n".join(bad)


def test_streaming_kernels_load_asynchronously(triton_recs):
    declared = {r["kernel"] for r in triton_recs if r["streaming"]}
    assert STREAMING_KERNELS <= declared, f"not marked streaming: {sorted(STREAMING_KERNELS - declared)}"
    unmarked = [_name(r) for r in triton_recs if r["kernel"] in STREAMING_KERNELS and not r["streaming"]]
    assert not unmarked, "configurations not marked streaming:\n" + "\n".join(unmarked)
    bad = [f"{_name(r)}: loop loads async={r['loop_async_loads']} sync={r['loop_sync_loads']}"
           for r in triton_recs if r["streaming"] and (r["loop_async_loads"] == 0 or r["loop_sync_loads"])]
    assert not bad, "streaming loops with synchronous global loads:\n" + "\n".join(bad)


def test_launch_specialisation_follows_triton():
    """ints are specialised as Triton's launcher does: 1 -> constant, multiple of 16 -> divisibility 16,
    other values unspecialised, beyond int32 -> i64; pointers 16-byte aligned."""
    pytest.importorskip("triton")
    from slim_ops.ops.tau_budget.triton import _tau_budget_confidence_kernel as k

    sig = {n: "i32" for n in k.arg_names}
    sig.update(p_logits="*bf16", p_tokens="*i64", p_conf="*fp32", p_seed="*i64", p_temp="*fp32",
               BV="constexpr", GREEDY="constexpr")
    spec = AotSpec(k, sig, {"BV": 128, "GREEDY": True},
                   ints={"K": 1, "V": 151936, "stride_r": 2**31 + 16, "stride_k": 151937})
    s, consts, attrs = launch_specialisation(spec)
    names = list(s)
    div16 = {names[i[0]] for i in attrs}
    assert s["K"] == "constexpr" and consts["K"] == 1
    assert s["V"] == "i32" and s["stride_r"] == "i64" and s["stride_k"] == "i32" and s["mask_id"] == "i32"
    assert div16 == {"p_logits", "p_tokens", "p_conf", "p_seed", "p_temp", "V", "stride_r"}
    with pytest.raises(ValueError, match="nope"):
        launch_specialisation(AotSpec(k, sig, {"BV": 128, "GREEDY": True}, ints={"nope": 3}))


def test_ptx_analysis_finds_loops_and_shapes():
    ptx = "\n".join([
        "ld.global.b32 %r1, [%rd1];",  # before the loop
        "$L__BB0_1:",
        "cp.async.cg.shared.global [ %r2 + 0 ], [ %rd2 + 0 ], 0x10, %r3;",
        "ld.global.v4.b32 {%r4, %r5, %r6, %r7}, [%rd3];",
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%f1}, %rd4, %rd5, 1, 1, 1, 0, 1;",
        "@%p1 bra $L__BB0_1;",
        "$L__BB0_2:",
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};",
        "bra.uni $L__BB0_4;",  # forward branch: not a loop
        # a rotated loop as LLVM lays them out: the latch block sits above the header, the header's
        # conditional part below the backward branch
        "$L__BB0_5:",
        "ld.global.b32 %r8, [%rd6];",  # in the loop (reached from the header, jumps back to it)
        "@%p2 bra $L__BB0_4;",
        "bra.uni $L__BB0_6;",
        "$L__BB0_4:",  # header
        "cp.async.ca.shared.global [ %r9 + 0 ], [ %rd7 + 0 ], 0x4, %r10;",
        "@%p3 bra $L__BB0_5;",
        "ld.global.b32 %r11, [%rd8];",  # body below the backward branch: still in the loop
        "bra.uni $L__BB0_5;",
        "$L__BB0_6:",
        "ld.global.b32 %r12, [%rd9];",  # after the loop
        "ret;",
    ])
    a = analyse_ptx(ptx)
    assert a["loop_async_loads"] == 2 and a["loop_sync_loads"] == 3 and a["async_loads"] == 2
    assert a["wgmma"] == ["m64n32k16"] and a["wgmma_n_min"] == 32 and a["mma_sync"] == ["m16n8k16"]


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc not installed")
def test_cuda_sources_compile_for_sm90a(report):
    recs = _run_aot("cuda")["cuda"]
    report(format_report([], recs))
    assert recs, "csrc/sources.txt lists no .cu file"
    errors = [f"{r['source']}:\n{r['error']}" for r in recs if not r["ok"]]
    assert not errors, "nvcc errors:\n" + "\n".join(errors)
    bad = [f"{f['name']}: {f.get('spill_stores')} B spill stores" for r in recs for f in r["functions"]
           if f.get("spill_stores") or f.get("spill_loads")]
    assert not bad, "CUDA kernels spill:\n" + "\n".join(bad)
