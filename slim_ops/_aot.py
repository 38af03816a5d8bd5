"""Ahead-of-time compilation of every kernel for Hopper (sm_90a) without a GPU.

Each ``slim_ops/ops/<op>/triton.py`` exposes ``AOT_SPECS``: a list of :class:`AotSpec`, one per
kernel configuration the launchers can pick. :func:`compile_triton` builds each for
``GPUTarget("cuda", 90, 32)`` with the specialisation a real launch gets (16-byte aligned pointers;
every integer argument whose launch value the spec states in ``ints`` specialised exactly as Triton's
launcher does: 1 becomes a constant, a multiple of 16 gets ``tt.divisibility = 16``, a value beyond
int32 becomes i64) and reports, per configuration:

- registers and spills (local memory / stack) from the cubin, read with the cuobjdump in triton's package;
- dynamic shared memory (``metadata.shared``: the pipeline buffers and layout conversions; the cubin's
  static 1 KB reservation is not it);
- the tensor-core instructions in the PTX: ``wgmma.mma_async`` shapes (m64nNk16) and any ``mma.sync``;
- the loads inside loops (backward branches in the PTX): asynchronous copies (``cp.async``, TMA
  ``cp.async.bulk.tensor``) versus synchronous ``ld.global``.

:func:`compile_cuda` runs nvcc with ``-Xptxas -v`` on every ``.cu`` of csrc/sources.txt for
compute_90a,sm_90a. Run as ``python -m slim_ops._aot [all|triton|cuda] [--json] [--jobs N]`` for a
report; it must run with TRITON_INTERPRET unset (the tests call it in a subprocess). Triton configurations
compile in ``--jobs`` worker processes (default: the CPU count, at most 4); triton's own cache
(``TRITON_CACHE_DIR``) makes a second run cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
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
    hot: bool = True  # on a hot path (reported; tests/test_compile.py requires no spills in every configuration)
    label: str = ""
    aligned: bool = True  # pointers 16-byte aligned, as real launches specialise them (enables vector/async loads)
    # representative launch values of integer arguments (strides, V, D, ...): each is specialised as Triton's
    # launcher specialises that value (==1 -> constant, %16 == 0 -> divisibility 16, beyond int32 -> i64).
    # Arguments not listed are compiled unspecialised (the conservative choice, e.g. a row count).
    ints: dict[str, int] = dataclasses.field(default_factory=dict)
    streaming: bool = False  # the hot loop streams global memory: its loads must be asynchronous


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
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"^\s*(@!?%\w+\s+)?bra(?:\.uni)?\s+(\$L__\w+)\s*;")
_EXIT = re.compile(r"^\s*(@!?%\w+\s+)?(ret|exit|trap)\b")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
_MMA_SYNC = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)")
_ASYNC_LOAD = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared|\bcp\.async\.bulk\.tensor")
_SYNC_LOAD = re.compile(r"\bld\.global")


def _loop_lines(lines: list[str]) -> list[bool]:
    """Which PTX lines lie in a loop: basic blocks (split at labels and after branches) that are part of a
    cycle of the control-flow graph (a strongly connected component with an edge inside it)."""
    starts = [0]
    for i, ln in enumerate(lines):
        if _LABEL.match(ln) and i != starts[-1]:
            starts.append(i)
        elif (_BRANCH.match(ln) or _EXIT.match(ln)) and i + 1 < len(lines):
            starts.append(i + 1)
    starts = sorted(set(starts))
    ends = starts[1:] + [len(lines)]
    block_of_label = {}
    for b, st in enumerate(starts):
        m = _LABEL.match(lines[st])
        if m:
            block_of_label[m.group(1)] = b
    succ: list[list[int]] = []
    for b, (st, en) in enumerate(zip(starts, ends, strict=True)):
        out = []
        last = next((lines[i] for i in range(en - 1, st - 1, -1) if lines[i].strip()
                     and not lines[i].strip().startswith("//")), "")
        m = _BRANCH.match(last)
        falls = True
        if m:
            if m.group(2) in block_of_label:
                out.append(block_of_label[m.group(2)])
            falls = m.group(1) is not None  # predicated branch falls through
        elif _EXIT.match(last) and _EXIT.match(last).group(1) is None:
            falls = False
        if falls and b + 1 < len(starts):
            out.append(b + 1)
        succ.append(out)
    # Tarjan's strongly connected components, iteratively
    n = len(starts)
    index, low, on_stack, stack, comp = [-1] * n, [0] * n, [False] * n, [], [-1] * n
    counter = n_comp = 0
    for root in range(n):
        if index[root] >= 0:
            continue
        work = [(root, 0)]
        while work:
            v, k = work.pop()
            if k == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if k < len(succ[v]):
                work.append((v, k + 1))
                w = succ[v][k]
                if index[w] < 0:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    comp[w] = n_comp
                    if w == v:
                        break
                n_comp += 1
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
    in_loop_block = [any(comp[w] == comp[b] for w in succ[b]) for b in range(n)]
    flags = [False] * len(lines)
    for b, (st, en) in enumerate(zip(starts, ends, strict=True)):
        if in_loop_block[b]:
            flags[st:en] = [True] * (en - st)
    return flags


def analyse_ptx(ptx: str) -> dict[str, Any]:
    """Tensor-core shapes and the loads inside loops (cycles of the control-flow graph) of a kernel's PTX."""
    lines = ptx.splitlines()
    in_loop = _loop_lines(lines)
    loop_async = sum(len(_ASYNC_LOAD.findall(ln)) for ln, f in zip(lines, in_loop, strict=True) if f)
    loop_sync = sum(len(_SYNC_LOAD.findall(ln)) for ln, f in zip(lines, in_loop, strict=True) if f)
    shapes = _WGMMA.findall(ptx)
    return {
        "wgmma": sorted({f"m{m}n{n}k{k}" for m, n, k in shapes}, key=lambda s: int(s.split("n")[1].split("k")[0])),
        "wgmma_n_min": min((int(n) for _, n, _ in shapes), default=0),
        "mma_sync": sorted(set(_MMA_SYNC.findall(ptx))),
        "loop_branches": sum(1 for ln, f in zip(lines, in_loop, strict=True) if f and _BRANCH.match(ln)),
        "loop_async_loads": loop_async,
        "loop_sync_loads": loop_sync,
        "async_loads": len(_ASYNC_LOAD.findall(ptx)),
    }


def launch_specialisation(spec: AotSpec) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
    """(signature, constexprs, attrs) of `spec` as a real launch with its pointer alignment and `ints` gets."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn = spec.kernel
    params = {p.name: p for p in getattr(fn, "params", [])}
    unknown = set(spec.ints) - set(spec.signature)
    if unknown:
        raise ValueError(f"ints names unknown argument(s) {sorted(unknown)}")
    sig = dict(spec.signature)
    consts = dict(spec.constexprs)
    attrs: dict[tuple[int], list] = {}
    for i, (name, ty) in enumerate(spec.signature.items()):
        p = params.get(name)
        if ty.startswith("*"):
            if spec.aligned and not (p is not None and p.do_not_specialize_on_alignment):
                attrs[(i,)] = CUDABackend.parse_attr("D")
        elif name in spec.ints:
            if ty == "constexpr":
                raise ValueError(f"{name} is a constexpr, not an integer argument")
            specialise = not (p is not None and p.do_not_specialize)
            align = not (p is not None and p.do_not_specialize_on_alignment)
            kind, attr = native_specialize_impl(CUDABackend, int(spec.ints[name]), False, specialise, align)
            annotated = getattr(p, "annotation_type", None) if p is not None else None
            if isinstance(annotated, str) and annotated:  # an annotated argument keeps its type (as at launch)
                kind = annotated
                if annotated == "u1" or annotated[:2] in ("fp", "bf"):
                    attr = None
            if kind == "constexpr":
                sig[name] = "constexpr"
                consts[name] = attr
            else:
                sig[name] = kind
                if isinstance(attr, str) and attr:
                    attrs[(i,)] = CUDABackend.parse_attr(attr)
    return sig, consts, attrs


def _specialised_names(sig: dict[str, str], attrs: dict) -> str:
    names = list(sig)
    return ",".join(names[i[0]] for i in attrs if not sig[names[i[0]]].startswith("*"))


def _compile_one(mod_name: str, index: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.import_module(mod_name).AOT_SPECS[index]
    fn = spec.kernel
    name = getattr(fn, "__name__", None) or fn.fn.__name__
    rec: dict[str, Any] = {"module": mod_name, "kernel": name, "label": spec.label,
                           "constexprs": {k: str(v) for k, v in spec.constexprs.items()},
                           "num_warps": spec.num_warps, "num_stages": spec.num_stages, "hot": spec.hot,
                           "streaming": spec.streaming}
    t0 = time.perf_counter()
    try:
        sig, consts, attrs = launch_specialisation(spec)
        rec["div16"] = _specialised_names(sig, attrs)
        rec["const1"] = ",".join(n for n in spec.ints if sig[n] == "constexpr")
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        rec.update(_resources(c.asm["cubin"]))
        rec["shared"] = int(c.metadata.shared)
        rec.update(analyse_ptx(c.asm["ptx"]))
        rec["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported, and the test fails on it
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _compile_many(jobs: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [_compile_one(m, i) for m, i in jobs]


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def compile_triton(modules: list[str] | None = None, jobs: int | None = None) -> list[dict[str, Any]]:
    """Compile every AOT_SPECS entry of `modules` (default: every op with a triton.py), in order."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run the AOT compile with TRITON_INTERPRET unset")
    work = []
    for mod_name in modules or _ops_with_triton():
        n = len(getattr(importlib.import_module(mod_name), "AOT_SPECS", []))
        work += [(mod_name, i) for i in range(n)]
    jobs = max(1, min(jobs or default_jobs(), len(work) or 1))
    if jobs == 1:
        return _compile_many(work)
    import multiprocessing

    from slim_ops._aot import _compile_many as compile_share  # picklable by module name, also under -m

    # interleaved shares: neighbouring specs (similar cost) go to different workers
    shares = [work[w::jobs] for w in range(jobs)]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(compile_share, shares))
    out: list[dict[str, Any]] = [{}] * len(work)
    for w, recs in enumerate(results):
        for k, rec in enumerate(recs):
            out[w + k * jobs] = rec
    return out


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


def spills(rec: dict[str, Any]) -> bool:
    return bool(rec.get("local") or rec.get("stack"))


def format_report(triton_recs: list[dict[str, Any]], cuda_recs: list[dict[str, Any]]) -> str:
    lines = ["AOT compile report (sm_90a, launch-like specialisation)"]
    if triton_recs:
        lines.append(f"  {'triton kernel':<33} {'configuration':<30} {'w/s':>4} {'regs':>4} {'spill':>5} "
                     f"{'smem':>6} {'wgmma':<17} {'loop loads async/sync':>21}  ints%16")
    for r in triton_recs:
        head = f"  {r['kernel'][:33]:<33} {r['label'][:30]:<30}"
        if r["ok"]:
            mma = ",".join(s.split("k")[0] for s in r["wgmma"]) or ("mma.sync" if r["mma_sync"] else "-")
            spill = f"{r['local']}+{r['stack']}" if spills(r) else "0"
            lines.append(f"{head} {r['num_warps']:>2}/{r['num_stages']} {r['regs']:>4} {spill:>5} "
                         f"{r['shared']:>6} {mma[:17]:<17} {r['loop_async_loads']:>11}/{r['loop_sync_loads']:<9}"
                         f"  {len(r['div16'].split(',')) if r['div16'] else 0:>2}"
                         f"{' const1=' + r['const1'] if r['const1'] else ''}")
        else:
            lines.append(f"{head} COMPILE ERROR: ...{r['error'][-400:]}")
    for r in cuda_recs:
        if not r["ok"]:
            lines.append(f"  nvcc   {r['source']}: COMPILE ERROR\n{r['error']}")
        for f in r["functions"]:
            lines.append(f"  nvcc   {f['name'][:70]:<70} regs={f.get('regs', '?'):>3} "
                         f"spill stores={f.get('spill_stores', '?')} loads={f.get('spill_loads', '?')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m slim_ops._aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="all", choices=("all", "triton", "cuda"))
    ap.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes for Triton (default: min(4, CPUs))")
    ap.add_argument("--module", action="append", default=None,
                    help="only this triton module (e.g. slim_ops.ops.masked_logprob.triton); repeatable")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    t = compile_triton(args.module, args.jobs) if args.what in ("all", "triton") else []
    c = compile_cuda() if args.what in ("all", "cuda") else []
    if args.json:
        print(json.dumps({"triton": t, "cuda": c, "seconds": round(time.perf_counter() - t0, 1)}))
    else:
        print(format_report(t, c))
        print(f"({len(t)} Triton configurations, {sum(len(r['functions']) for r in c)} CUDA functions, "
              f"{time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
