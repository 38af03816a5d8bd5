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


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (command, user + system clock ticks) of every process (Linux /proc)."""
    out: dict[int, tuple[str, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(d)] = (name, int(fields[11]) + int(fields[12]))
    return out


def machine_load(sample_s: float = 1.0, busy_share: float = 0.1) -> dict[str, object]:
    """How busy the machine is, apart from this process: the 1/5/15-minute load averages and the other
    processes that used more than ``busy_share`` of a core over a ``sample_s`` window. ``quiet`` is True when
    no other process was busy (load averages are recorded but not judged: a benchmark's own earlier work
    raises them)."""
    t0 = _cpu_ticks()
    time.sleep(sample_s)
    t1 = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    busy = []
    for pid, (name, ticks) in t1.items():
        if pid == me or pid not in t0:
            continue
        share = (ticks - t0[pid][1]) / hz / sample_s
        if share > busy_share:
            busy.append({"pid": pid, "command": name, "cpu_share": round(share, 2)})
    la = os.getloadavg()
    return {"loadavg_1m": la[0], "loadavg_5m": la[1], "loadavg_15m": la[2], "cores": os.cpu_count(),
            "busy_processes": busy, "quiet": not busy, "sampled_s": sample_s}


def add_load_flag(ap) -> None:
    """The ``--allow-loaded`` option of every benchmark that writes a result file."""
    ap.add_argument("--allow-loaded", action="store_true",
                    help="write the result even when other processes were busy (it is marked quiet: false)")


def write_result(out_dir: str, name: str, payload: dict[str, object], *, load_before: dict[str, object],
                 allow_loaded: bool = False) -> str:
    """``write_json`` for results people read (README's "Measured" table cites them): the machine's load
    before and after the run goes into the file with ``quiet``; a run during which another process was busy
    is refused (nothing written, exit code 3) unless ``allow_loaded``."""
    return write_json(out_dir, name, {**payload, **load_fields(name, load_before, allow_loaded)})


def load_fields(name: str, load_before: dict[str, object], allow_loaded: bool) -> dict[str, object]:
    """The load record of a run that started with ``load_before`` (sampled now for the end); raises
    SystemExit (nothing to write) when another process was busy and ``allow_loaded`` is not set."""
    after = machine_load()
    quiet = bool(load_before.get("quiet")) and bool(after["quiet"])
    if not quiet and not allow_loaded:
        busy = [p["command"] for p in [*load_before["busy_processes"], *after["busy_processes"]]]  # type: ignore[index]
        raise SystemExit(f"{name}: other processes were busy ({', '.join(sorted(set(busy)))}): nothing written "
                         "(timings on a loaded machine mislead); rerun on an idle machine or pass --allow-loaded")
    return {"load_before": load_before, "load_after": after, "quiet": quiet}
