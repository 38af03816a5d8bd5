"""Build script: the pure-Python package always installs; ``slim_ops._C`` holds the C++ CPU kernels and, when
nvcc is found, the CUDA kernels.

SLIM_OPS_CUDA=AUTO (default) adds the CUDA kernels when nvcc is on PATH (or in $CUDA_HOME) and falls back to a
CPU-only extension with a warning when nvcc is missing or the CUDA build fails; ON makes the CUDA kernels
required; OFF builds the CPU-only extension. If even the CPU-only build fails (no C++ compiler), AUTO/OFF install
the pure-Python package with a warning. torch is not needed at build time: the kernels take raw pointers (and a
stream), and the binding is plain pybind11 (linked against the static CUDA runtime when CUDA is in). The CPU
kernels are compiled for the x86-64 baseline with AVX2/AVX-512 variants chosen at run time, so no -march flag
is used. No GPU is probed and nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _read_list(name: str) -> list[str]:
    lines = (ROOT / "csrc" / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


SOURCES = _read_list("sources.txt")
# SLIM_OPS_CUDA_ARCHS="compute_90a,sm_90a" (pairs separated by ";") overrides csrc/cuda_archs.txt, e.g. one arch
# for a quick build on a known GPU (benchmarks/gpu_check.sh).
_ARCH_ENV = [a.strip() for a in os.environ.get("SLIM_OPS_CUDA_ARCHS", "").split(";") if a.strip()]
ARCHS = [tuple(a.split(",")) for a in (_ARCH_ENV or _read_list("cuda_archs.txt"))]
if any(len(a) != 2 for a in ARCHS):
    sys.exit(f"CUDA arch list entries must be <virtual>,<real> pairs, got {ARCHS}")
MODE = os.environ.get("SLIM_OPS_CUDA", "AUTO").upper()
if MODE not in ("AUTO", "ON", "OFF"):
    sys.exit(f"SLIM_OPS_CUDA must be AUTO, ON or OFF, got {MODE!r}")


def _cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, or where nvcc lives (wrappers allowed)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
        try:  # `nvcc --list-gpu-arch` is not needed; ask the driver script where it really is
            out = subprocess.run([nvcc, "-v", "--version"], capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    cands.append(line.split("=", 1)[1].strip())
        except (OSError, subprocess.SubprocessError):
            pass
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


_CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden", "-pthread"]


class CudaBuildExt(build_ext):
    """Builds the .cpp sources (CPU kernels + bindings) and, with CUDA, the .cu sources with nvcc."""

    def build_extension(self, ext: Extension) -> None:
        if MODE != "OFF":
            try:
                self._build(ext)
                return
            except Exception as exc:  # noqa: BLE001 - AUTO mode degrades to the CPU-only extension
                if MODE == "ON":
                    raise
                print(f"slim_ops: CUDA kernels not built ({exc}); building the CPU-only extension", file=sys.stderr)
        try:
            self._build_cpu(ext)
        except Exception as exc:  # noqa: BLE001 - no C++ toolchain: a pure-Python install still works
            print(f"slim_ops: C++ extension not built ({exc}); torch/triton backends only", file=sys.stderr)

    def _build_cpu(self, ext: Extension) -> None:
        import pybind11

        ext.extra_objects = []
        ext.include_dirs = [pybind11.get_include(), str(ROOT / "csrc")]
        ext.library_dirs = []
        ext.libraries = ["pthread"]
        ext.define_macros = []
        ext.extra_compile_args = list(_CXX_FLAGS)
        ext.extra_link_args = ["-pthread"]
        super().build_extension(ext)

    def _build(self, ext: Extension) -> None:
        import pybind11

        cuda = _cuda_home()
        if cuda is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        nvcc = str(cuda / "bin" / "nvcc")
        build_tmp = Path(self.build_temp) / "cuda"
        build_tmp.mkdir(parents=True, exist_ok=True)
        gencode = [f"-gencode=arch={v},code={r}" for v, r in ARCHS]
        objects = []
        for src in [s for s in SOURCES if s.endswith(".cu")]:
            obj = build_tmp / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", str(ROOT / src), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "--expt-relaxed-constexpr", "-lineinfo", f"-I{ROOT / 'csrc'}", *gencode]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(str(obj))
        ext.extra_objects = objects
        ext.include_dirs = [pybind11.get_include(), str(cuda / "include"), str(ROOT / "csrc")]
        lib = cuda / "lib64" if (cuda / "lib64").exists() else cuda / "lib"
        ext.library_dirs = [str(lib)]
        ext.libraries = ["cudart_static", "rt", "pthread", "dl"]
        ext.define_macros = [("SLIM_OPS_WITH_CUDA", "1")]
        ext.extra_compile_args = list(_CXX_FLAGS)
        ext.extra_link_args = ["-pthread"]
        super().build_extension(ext)


ext_modules = [Extension("slim_ops._C", sources=[s for s in SOURCES if s.endswith(".cpp")], language="c++")]

setup(
    packages=find_packages(include=["slim_ops", "slim_ops.*"])
    + ["slim_rl"] + [f"slim_rl.{p}" for p in find_packages(str(ROOT / "python" / "slim_rl"))],
    package_dir={"slim_ops": "slim_ops", "slim_rl": "python/slim_rl"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CudaBuildExt},
    include_package_data=True,
)
