"""Shared benchmark plumbing: timing (median/p20/p80 of many runs), run metadata and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 3, reps: int = 20,
            min_seconds: float = 0.0) -> dict[str, float]:
    """Wall time of fn() in ms: CUDA events on a GPU, perf_counter on the CPU. Inputs live outside fn."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start < min_seconds and len(times) < 10 * reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "runs": len(times)}


def git_sha() -> str:
    """$GIT_SHA when set (a copy of the tree without .git, e.g. on a GPU machine), else `git rev-parse HEAD`."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        sha = ""
    return sha or "unknown"


def metadata(device: str) -> dict[str, object]:
    sha = git_sha()
    meta: dict[str, object] = {"device": device, "torch": torch.__version__, "git_sha": sha,
                               "python": platform.python_version(), "host": platform.node(),
                               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    else:
        meta["gpu"] = None
        meta["label"] = "CPU"
    return meta


def write_json(out_dir: str, name: str, payload: dict[str, object]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = os.path.join(out_dir, f"{name}_{payload.get('meta', {}).get('device', 'x')}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def peak_memory_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
