"""Run untrusted generated Python code in a throwaway, resource-limited subprocess.

Layers (each one alone stops the common failure; together they cover the acceptance cases):

1. **Resource limits** (``setrlimit`` in the child before ``exec``): CPU seconds, address space,
   file size, open files, no core dumps, process count (see below); a wall-clock timeout kills the
   child's whole session (``start_new_session`` + ``killpg``).
2. **A throwaway working directory** (``tempfile.mkdtemp``) removed afterwards; ``HOME`` and ``TMPDIR``
   point into it and the environment is reduced to a few variables.
3. **An audit hook** (PEP 578) installed before the program runs refuses: opening files for writing
   and creating / removing / renaming paths outside the directory, sockets, ``fork`` / ``exec`` /
   ``spawn`` / ``system`` / ``subprocess``, and ``ctypes`` (which could bypass the rest).
4. **When running as root**: the child gets a fresh network namespace (``unshare(CLONE_NEWNET)``,
   no interfaces, so no network even for native code), then drops to ``nobody`` (so the process-count
   limit applies and the file system's permissions protect everything outside the directory).
   As an unprivileged user the process limit is set to the user's current process count + a margin.
   (As root the interpreter must be one ``nobody`` can execute, e.g. /usr/bin/python3; when none is,
   the child stays root in its own network namespace and only the audit hook bounds forking.)
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["SandboxLimits", "SandboxResult", "run_python"]

_CLONE_NEWNET = 0x40000000
_NOBODY = 65534


@dataclass
class SandboxLimits:
    """Limits for one sandboxed run (seconds, MiB, counts)."""

    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    max_procs: int = 8
    file_mb: int = 8
    open_files: int = 64
    output_bytes: int = 64 * 1024
    audit_hook: bool = True  # False only to test the other layers on their own


@dataclass
class SandboxResult:
    """Outcome of one run. ``passed`` = exited 0 within the limits."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float

    @property
    def passed(self) -> bool:
        return (not self.timed_out) and self.returncode == 0


# The bootstrap runs first inside the child: installs the audit hook, then executes the program.
_BOOT = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DENY = ("socket.", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
         "subprocess.Popen", "ctypes.", "os.kill", "os.killpg", "pty.", "os.setuid", "os.setgid")
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.replace": 2, "os.link": 2,
                "os.symlink": 2, "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1,
                "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.move": 2, "os.chdir": 1}

def _inside(p):
    if isinstance(p, int):
        return True
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    p = os.path.realpath(os.path.join(_ROOT, os.fspath(p)))
    return p == _ROOT or p.startswith(_ROOT + os.sep)

def _hook(event, args):
    if event.startswith(_DENY):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, 0))[:3]
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        writing = writing or bool((flags or 0) & _WRITE_FLAGS)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
    n = _PATH_EVENTS.get(event)
    if n:
        for p in args[:n]:
            if p is not None and not isinstance(p, int) and not _inside(p):
                raise PermissionError(f"sandbox: {event} on {p!r} outside the sandbox directory "
                                      "is not allowed")

if _GUARD:
    sys.addaudithook(_hook)
_src = open("program.py").read()
_g = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
exec(compile(_src, "program.py", "exec"), _g)
'''


def _world_runnable(path: str) -> bool:
    """True when an unprivileged user can execute ``path`` (every directory on the way searchable)."""
    import stat

    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
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


def _interpreter(as_root: bool, python: str | None) -> tuple[str, bool]:
    """(interpreter, drop_to_nobody): as root prefer one that ``nobody`` can run."""
    if python is not None:
        return python, as_root and _world_runnable(python)
    if not as_root:
        return sys.executable, False
    for cand in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if cand and _world_runnable(cand):
            return cand, True
    return sys.executable, False


def _user_procs(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            n += int(line.split()[1]) == uid
                            break
            except OSError:
                continue
    return n


def _preexec(limits: SandboxLimits, as_root: bool, drop: bool, nproc: int):
    def fn() -> None:
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if as_root:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.unshare(_CLONE_NEWNET)
            except Exception:  # noqa: BLE001 - the audit hook still refuses sockets
                pass
        if drop:
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return fn


def run_python(code: str, *, tests: str = "", stdin: str | None = None, limits: SandboxLimits | None = None,
               python: str | None = None) -> SandboxResult:
    """Run ``code`` followed by ``tests`` (e.g. asserts) as one Python program in a sandbox.

    Args:
        code: the untrusted program text. tests: appended after a newline (a failing assert → rc ≠ 0).
        stdin: text fed to the program's standard input.
        limits: :class:`SandboxLimits` (defaults: 5 s wall, 4 s CPU, 512 MiB, 8 processes, 8 MiB files).
        python: interpreter path (default: this one).
    Returns:
        :class:`SandboxResult`; never raises for anything the program does.
    """
    if not isinstance(code, str) or not isinstance(tests, str):
        raise TypeError(f"code and tests must be str, got {type(code).__name__} and {type(tests).__name__}")
    limits = limits or SandboxLimits()
    as_root = os.geteuid() == 0
    interp, drop = _interpreter(as_root, python)
    root = tempfile.mkdtemp(prefix="slim_sandbox_")
    try:
        with open(os.path.join(root, "program.py"), "w") as f:
            f.write(code + "\n" + tests + "\n")
        with open(os.path.join(root, "_boot.py"), "w") as f:
            f.write(f"_GUARD = {bool(limits.audit_hook)}\n" + _BOOT)
        if drop:
            os.chown(root, _NOBODY, _NOBODY)
            for name in ("program.py", "_boot.py"):
                os.chown(os.path.join(root, name), _NOBODY, _NOBODY)
            nproc = limits.max_procs
        else:
            nproc = _user_procs(os.getuid()) + limits.max_procs
        env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        t0 = time.monotonic()
        proc = subprocess.Popen([interp, "-I", "-S", "-B", "_boot.py"], cwd=root, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=_preexec(limits, as_root, drop, nproc))
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode() if stdin else None, timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, err = proc.communicate()
        _kill_group(proc.pid)  # anything the program left behind in its session
        wall = time.monotonic() - t0
        cap = limits.output_bytes
        return SandboxResult(proc.returncode, out[:cap].decode(errors="replace"),
                             err[:cap].decode(errors="replace"), timed_out, wall)
    except OSError as e:  # could not even start: report as a failed run, the caller carries on
        return SandboxResult(None, "", f"sandbox: could not run the program: {e}", False, 0.0)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
