"""Ahead-of-time compilation of every kernel for Hopper (sm_90a) without a GPU.

Each ``slim_ops/ops/<op>/triton.py`` exposes ``AOT_SPECS``: a list of :class:`AotSpec`, one per
kernel configuration the launchers can pick. :func:`compile_triton` builds each for
``GPUTarget("cuda", 90, 32)`` and reads registers / spills from the cubin with the cuobjdump that
ships in triton's package. :func:`compile_cuda` runs nvcc with ``-Xptxas -v`` on every ``.cu`` of
csrc/sources.txt for compute_90a,sm_90a. Run as ``python -m slim_ops._aot`` for a report; it must
run with TRITON_INTERPRET unset (the tests call it in a subprocess).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class AotSpec:
    """One compiled configuration of a @triton.jit kernel."""

    kernel: Any  # the @triton.jit function
    signature: dict[str, str]  # arg name -> "*fp32", "i32", "fp32", "constexpr", ...
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    hot: bool = True  # hot kernels must not spill
    label: str = ""
    aligned: bool = True  # pointers 16-byte aligned, as real launches specialise them (enables vector/async loads)


def signature(kernel: Any, ptrs: dict[str, str], constexprs: dict[str, Any], scalar: str = "i32",
              scalars: dict[str, str] | None = None) -> dict[str, str]:
    """A kernel's signature in argument order: ``ptrs[name]`` for pointers, "constexpr" for every name in
    `constexprs`, ``scalars[name]`` or `scalar` for the remaining (integer) arguments."""
    names = list(kernel.arg_names)
    scalars = scalars or {}
    unknown = (set(ptrs) | set(constexprs) | set(scalars)) - set(names)
    if unknown:
        raise ValueError(f"{names} has no argument(s) {sorted(unknown)}")
    return {n: ptrs[n] if n in ptrs else "constexpr" if n in constexprs else scalars.get(n, scalar) for n in names}


def _ops_with_triton() -> list[str]:
    ops = []
    for p in sorted((Path(__file__).parent / "ops").iterdir()):
        if (p / "triton.py").exists():
            ops.append(f"slim_ops.ops.{p.name}.triton")
    return ops


def _cuobjdump() -> str:
    import triton

    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(cand) if cand.exists() else (shutil.which("cuobjdump") or "cuobjdump")


def _resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump output: {out}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"regs": reg, "stack": stack, "shared": shared, "local": local}


def compile_triton(modules: list[str] | None = None) -> list[dict[str, Any]]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run the AOT compile with TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    records = []
    for mod_name in modules or _ops_with_triton():
        mod = importlib.import_module(mod_name)
        for spec in getattr(mod, "AOT_SPECS", []):
            fn = spec.kernel
            name = getattr(fn, "__name__", None) or fn.fn.__name__
            rec: dict[str, Any] = {"module": mod_name, "kernel": name, "label": spec.label,
                                   "constexprs": {k: str(v) for k, v in spec.constexprs.items()},
                                   "num_warps": spec.num_warps, "hot": spec.hot}
            try:
                attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(spec.signature.values())
                         if spec.aligned and t.startswith("*")}
                src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
                c = triton.compile(src, target=target,
                                   options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
                rec.update(_resources(c.asm["cubin"]))
                rec["ok"] = True
            except Exception as exc:  # noqa: BLE001 - reported, and the test fails on it
                rec["ok"] = False
                rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            records.append(rec)
    return records


def _read_list(name: str) -> list[str]:
    lines = (ROOT / "csrc" / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def compile_cuda() -> list[dict[str, Any]]:
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in [s for s in _read_list("sources.txt") if s.endswith(".cu")]:
            cmd = [str(nvcc), "-c", str(ROOT / src), "-o", f"{tmp}/{Path(src).stem}.o", "-O3", "-std=c++17",
                   "--expt-relaxed-constexpr", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}",
                   "-gencode=arch=compute_90a,code=sm_90a"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            rec: dict[str, Any] = {"source": src, "ok": p.returncode == 0, "functions": []}
            if p.returncode != 0:
                rec["error"] = (p.stderr or p.stdout)[-4000:]
            fn = None
            for line in (p.stderr + p.stdout).splitlines():
                m = re.search(r"Compiling entry function '([^']+)'", line)
                if m:
                    fn = {"name": m.group(1)}
                    rec["functions"].append(fn)
                m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m and fn is not None:
                    fn["spill_stores"], fn["spill_loads"] = int(m.group(1)), int(m.group(2))
                m = re.search(r"Used (\d+) registers", line)
                if m and fn is not None:
                    fn["regs"] = int(m.group(1))
            records.append(rec)
    return records


def format_report(triton_recs: list[dict[str, Any]], cuda_recs: list[dict[str, Any]]) -> str:
    lines = ["AOT compile report (sm_90a)"]
    for r in triton_recs:
        if r["ok"]:
            spill = "SPILLS" if r["local"] or r["stack"] else "no spills"
            lines.append(f"  triton {r['kernel']:<40} {r['label']:<28} warps={r['num_warps']} regs={r['regs']:>3} "
                         f"smem={r['shared']:>6} local={r['local']} stack={r['stack']} {spill}")
        else:
            lines.append(f"  triton {r['kernel']:<40} {r['label']:<28} COMPILE ERROR: {r['error'][:300]}")
    for r in cuda_recs:
        if not r["ok"]:
            lines.append(f"  nvcc   {r['source']}: COMPILE ERROR\n{r['error']}")
        for f in r["functions"]:
            lines.append(f"  nvcc   {f['name'][:70]:<70} regs={f.get('regs', '?'):>3} "
                         f"spill stores={f.get('spill_stores', '?')} loads={f.get('spill_loads', '?')}")
    return "\n".join(lines)


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    t = compile_triton() if what in ("all", "triton") else []
    c = compile_cuda() if what in ("all", "cuda") else []
    if "--json" in sys.argv:
        print(json.dumps({"triton": t, "cuda": c}))
    else:
        print(format_report(t, c))


if __name__ == "__main__":
    main()
