"""Build script: the pure-Python package always installs; ``slim_ops._C`` is built when nvcc is found.

SLIM_OPS_CUDA=AUTO (default) builds the CUDA extension when nvcc is on PATH (or in $CUDA_HOME) and
skips it with a warning when the build fails; ON makes it required; OFF skips it. torch is not needed
at build time: the kernels take raw pointers and a stream, and the binding is plain pybind11 linked
against the static CUDA runtime. No GPU is probed and nothing is downloaded.
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
ARCHS = [tuple(a.split(",")) for a in _read_list("cuda_archs.txt")]
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


class CudaBuildExt(build_ext):
    """Compiles the .cu sources with nvcc, then lets setuptools link them with the pybind11 module."""

    def build_extension(self, ext: Extension) -> None:
        try:
            self._build(ext)
        except Exception as exc:  # noqa: BLE001 - AUTO mode degrades to a pure-Python install
            if MODE == "ON":
                raise
            print(f"slim_ops: CUDA extension not built ({exc}); torch/triton backends only", file=sys.stderr)

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
        ext.extra_compile_args = ["-O3", "-std=c++17", "-fvisibility=hidden"]
        super().build_extension(ext)


ext_modules = []
if MODE != "OFF":
    cpp = [s for s in SOURCES if s.endswith(".cpp")]
    ext_modules.append(Extension("slim_ops._C", sources=cpp, language="c++"))

setup(
    packages=find_packages(include=["slim_ops", "slim_ops.*"])
    + ["slim_rl"] + [f"slim_rl.{p}" for p in find_packages(str(ROOT / "python" / "slim_rl"))],
    package_dir={"slim_ops": "slim_ops", "slim_rl": "python/slim_rl"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CudaBuildExt},
    include_package_data=True,
)
