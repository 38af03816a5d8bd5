"""The one glue layer between slim_ops and its compiled extension ``slim_ops._C`` (csrc/).

- :func:`extension` loads ``slim_ops._C`` once (None when it was not built) and checks that its dtype-code
  table (exported from csrc/dtype_codes.h) equals :data:`DTYPE_CODES`, the table the Python side uses;
- :func:`require` returns the extension or fails with a message saying how to build what is missing;
- :func:`dtype_code`, :func:`check_tensor` and :func:`check_status` are the argument checker and the error
  translation shared by every op's ``cuda.py`` / ``cpu.py`` wrapper.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

# The one dtype-code table (csrc/dtype_codes.h holds the same numbers; `extension()` checks they agree).
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_BUILD_HINT = {
    "cuda": "reinstall with nvcc on PATH, e.g. `SLIM_OPS_CUDA=ON pip install --no-build-isolation -e .`",
    "cpu": "reinstall with a C++ compiler available, e.g. `pip install --no-build-isolation -e .`",
}


@functools.cache
def extension():
    """The compiled ``slim_ops._C`` module, or None when it was not built."""
    try:
        from slim_ops import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    exported = {getattr(torch, name): code for name, code in dict(getattr(_C, "dtype_codes", {})).items()}
    if exported != DTYPE_CODES:
        raise RuntimeError(f"slim_ops._C dtype codes {exported} differ from slim_ops._ext.DTYPE_CODES "
                           f"{DTYPE_CODES}: the extension is stale, rebuild the package")
    return _C


def has_cuda_kernels() -> bool:
    ext = extension()
    return ext is not None and bool(getattr(ext, "with_cuda", False))


def require(symbol: str, kind: str):
    """The extension, which must provide `symbol` (a function of the `kind` "cuda" or "cpu" kernels)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"slim_ops._C is not built: {_BUILD_HINT[kind]}")
    if not hasattr(ext, symbol):
        what = "without the CUDA kernels" if kind == "cuda" else f"without {symbol!r}"
        raise RuntimeError(f"slim_ops._C was built {what}: {_BUILD_HINT[kind]}")
    return ext


def dtype_code(fn: str, name: str, t: torch.Tensor) -> int:
    """The csrc dtype code of `t` (bf16 / fp16 / fp32)."""
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise ValueError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return code


def check_tensor(fn: str, name: str, t: torch.Tensor, *, shape: tuple[int, ...] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None, device: torch.device | str | None = None,
                 contiguous: bool = False, last_dim_contiguous: bool = False) -> None:
    """Raise one ValueError naming `name` and what was expected when `t` breaks the raw-pointer contract."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    # the common case in a few attribute reads (this runs on every kernel call); the message is built below
    if ((shape is None or t.shape == shape)
            and (dtypes is None or (isinstance(dtypes, (tuple, frozenset)) and t.dtype in dtypes))
            and (device is None or (t.device.type == device if isinstance(device, str) and ":" not in device
                                    else False))
            and (not contiguous or t.is_contiguous())
            and (not last_dim_contiguous or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1)
            and (t.numel() == 0 or t.data_ptr() % t.element_size() == 0)):
        return
    problems = []
    if shape is not None and tuple(t.shape) != tuple(shape):
        problems.append(f"shape {tuple(shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            problems.append("dtype " + "/".join(str(d).replace("torch.", "") for d in dtypes))
    if device is not None:
        want = torch.device(device)
        if t.device.type != want.type or (want.index is not None and t.device != want):
            problems.append(f"device {want}")
    if contiguous and not t.is_contiguous():
        problems.append("contiguous memory")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        problems.append("stride(-1) == 1")
    if t.numel() > 0 and t.data_ptr() % t.element_size() != 0:
        problems.append(f"a data pointer aligned to {t.element_size()} bytes")
    if problems:
        raise ValueError(f"{fn}: {name} must have {', '.join(problems)}; got shape {tuple(t.shape)} "
                         f"{str(t.dtype).replace('torch.', '')} on {t.device} with strides {tuple(t.stride())}")


def check_status(code: int, fn: str, kind: str) -> None:
    """Turn the error code a kernel launcher returned into a RuntimeError ("cuda": cudaError_t, "cpu")."""
    if code == 0:
        return
    ext = extension()
    if kind == "cuda":
        raise RuntimeError(f"slim_ops._C.{fn} failed: CUDA error {code} ({ext.error_string(code)})")
    raise RuntimeError(f"slim_ops._C.{fn} failed: error {code} ({ext.cpu_error_string(code)})")
