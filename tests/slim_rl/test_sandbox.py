"""Sandboxed execution of generated code (issue 6, acceptance 5)."""

from __future__ import annotations

import os
import uuid

import pytest

from slim_rl.rewards import code_reward
from slim_rl.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=256, max_procs=8)


def test_good_program_passes_and_failing_test_fails():
    ok = run_python("def add(a, b):\n    return a + b", tests="assert add(2, 3) == 5\nprint('ok')",
                    limits=FAST)
    assert ok.passed and ok.stdout.strip() == "ok", ok
    bad = run_python("def add(a, b):\n    return a - b", tests="assert add(2, 3) == 5", limits=FAST)
    assert not bad.passed and "AssertionError" in bad.stderr


def test_infinite_loop_is_stopped():
    r = run_python("while True:\n    pass", limits=FAST)
    assert not r.passed and r.wall_s < FAST.wall_s + 2.0


def test_sleep_forever_is_killed_at_wall_time():
    r = run_python("import time\ntime.sleep(60)", limits=SandboxLimits(wall_s=1.0, cpu_s=1))
    assert r.timed_out and not r.passed and r.wall_s < 3.0


@pytest.mark.parametrize("audit_hook", [True, False])
def test_fork_bomb_is_stopped(audit_hook):
    lim = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=256, max_procs=8, audit_hook=audit_hook)
    if not audit_hook and os.geteuid() == 0:
        from slim_rl.sandbox import _interpreter

        if not _interpreter(True, None)[1]:
            pytest.skip("no interpreter that 'nobody' can run: the process limit does not bind root")
    r = run_python("import os\nwhile True:\n    os.fork()", limits=lim)
    assert not r.passed and r.wall_s < lim.wall_s + 2.0


@pytest.mark.parametrize("audit_hook", [True, False])
def test_unbounded_allocation_is_stopped(audit_hook):
    lim = SandboxLimits(wall_s=5.0, cpu_s=2, memory_mb=256, audit_hook=audit_hook)
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", limits=lim)
    assert not r.passed and ("MemoryError" in r.stderr or r.returncode != 0)


def test_write_outside_directory_is_refused():
    target = f"/tmp/slim_sandbox_escape_{uuid.uuid4().hex}"
    r = run_python(f"open({target!r}, 'w').write('x')", limits=FAST)
    assert not r.passed and not os.path.exists(target)
    r = run_python(f"import os\nos.mkdir({target!r})", limits=FAST)
    assert not r.passed and not os.path.exists(target)
    # writing inside its own directory works
    r = run_python("open('scratch.txt', 'w').write('hi')\nprint(open('scratch.txt').read())", limits=FAST)
    assert r.passed and r.stdout.strip() == "hi"


def test_socket_is_refused():
    r = run_python("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))", limits=FAST)
    assert not r.passed and ("PermissionError" in r.stderr or "OSError" in r.stderr)


def test_subprocess_and_ctypes_are_refused():
    r = run_python("import subprocess\nsubprocess.run(['true'])", limits=FAST)
    assert not r.passed and "not allowed" in r.stderr
    r = run_python("import ctypes\nctypes.CDLL(None).fork()", limits=FAST)
    assert not r.passed and "not allowed" in r.stderr


def test_code_reward_carries_on_through_hostile_programs():
    tests = "assert square(3) == 9\nassert square(-2) == 4"
    programs = [
        "def square(x):\n    while True:\n        pass",
        "import os\ndef square(x):\n    os.fork()\n    return x * x",
        "def square(x):\n    return [0] * (10**12)",
        "def square(x):\n    open('/etc/slim_evil', 'w')\n    return x * x",
        "import socket\nsocket.create_connection(('8.8.8.8', 53))\ndef square(x):\n    return x * x",
        "def square(x):\n    return x * x",
        "this is not python",
    ]
    rewards = code_reward(programs, [tests] * len(programs), limits=FAST)
    assert rewards == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert not os.path.exists("/etc/slim_evil")
