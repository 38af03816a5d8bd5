"""Rewards: exact match, math-verify equivalence (worker process), code tests judged outside the program,
truncation rule."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from slim_rl.rewards import code_reward, exact_match_reward, extract_code, math_reward, parse_tests, truncation_mask


def test_exact_match():
    assert exact_match_reward([[1, 2], [1, 2, 3], []], [[1, 2], [1, 2], []]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        exact_match_reward([[1], [2]], [[1]])


def test_math_reward_equivalence():
    resp = ["so the answer is \\boxed{\\frac{1}{2}}", "the result is $0.5$", "\\boxed{3}", "no idea",
            "\\boxed{x+1}"]
    gold = ["0.5", "\\frac{1}{2}", "4", "2", "1+x"]
    assert math_reward(resp, gold) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_truncation_mask():
    m = truncation_mask(torch.tensor([10, 27, 32, 0]), 32)
    assert m.tolist() == [False, True, True, False]


def test_extract_code():
    assert extract_code("text\n```python\ndef f():\n    return 1\n```\nmore") == "def f():\n    return 1\n"
    assert extract_code("def g(): pass") == "def g(): pass"


# --------------------------------------------------------------------------------------------------
# math_reward: a worker process with a hard timeout, from any thread

def test_math_reward_timeout_holds_from_a_worker_thread():
    assert math_reward(["\\boxed{2}"], ["2"]) == [1.0]  # warm the worker (its start is not the limit)
    out: dict = {}

    def work() -> None:
        t0 = time.monotonic()
        out["r"] = math_reward(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{4}"], ["1", "4"], timeout=2)
        out["t"] = time.monotonic() - t0

    th = threading.Thread(target=work)
    th.start()
    th.join(60)
    assert not th.is_alive()
    # the tower scores 0 within its 2 s (+1 s grace), the next answer still gets checked (a fresh worker)
    assert out["r"] == [0.0, 1.0]
    assert out["t"] < 2 + 1 + 30, out  # 30 s: restarting the worker after a kill imports math-verify again


def test_math_reward_checks_its_arguments():
    with pytest.raises(ValueError, match="timeout"):
        math_reward(["1"], ["1"], timeout=0)
    with pytest.raises(ValueError, match="1 responses but 2 answers"):
        math_reward(["1"], ["1", "2"])


# --------------------------------------------------------------------------------------------------
# code_reward: tests parsed here, calls run in the sandbox, checks judged here

MBPP = ("assert remove_occ(\"hello\", \"l\") == \"heo\"\nassert remove_occ(\"abcda\", \"a\") == \"bcd\"\n"
        "assert remove_occ(\"PHP\", \"P\") == \"H\"")
MBPP_OK = ("def remove_occ(s, ch):\n    i = s.find(ch)\n    j = s.rfind(ch)\n    if i < 0:\n        return s\n"
           "    s = s[:i] + s[i + 1:]\n    j = s.rfind(ch)\n    return s[:j] + s[j + 1:] if j >= 0 else s")
HUMANEVAL = '''
METADATA = {"author": "jt", "dataset": "test"}


def check(candidate):
    assert candidate([1.0, 2.0, 3.0], 0.5) == False
    assert candidate([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3) == True
    assert abs(candidate.__doc__ is None or 1) == 1
    assert candidate([1.1, 2.2], 1.0) is False
    assert True, "This prints if this assert fails (good for debugging!)"

check(has_close_elements)
'''
HUMANEVAL_OK = ('''from itertools import combinations\n\n\ndef has_close_elements(numbers, threshold):\n'''
                '''    return any(abs(a - b) < threshold for a, b in combinations(numbers, 2))\n''')


def test_parse_tests_splits_calls_from_expected_values():
    plan = parse_tests("import math\nxs = [3, 1, 2]\nwant = [1, 2, 3]\n"
                       "assert sorted_copy(xs) == want\nassert math.isclose(mean(xs), 2.0, rel_tol=1e-9)\n"
                       "assert len(sorted_copy(xs)) == 3 and sorted_copy([]) == []\nassert sorted_copy(xs)[0] == 1")
    assert plan.calls == ["sorted_copy(xs)", "mean(xs)", "sorted_copy(xs)", "sorted_copy([])", "sorted_copy(xs)"]
    # the expected values never go to the sandbox: only what the calls use does
    assert "want" not in plan.setup and "xs = [3, 1, 2]" in plan.setup and "import math" in plan.setup
    assert plan.env["want"] == [1, 2, 3]
    he = parse_tests(HUMANEVAL)
    assert he.alias == "candidate" and he.entry == "has_close_elements" and "METADATA" not in he.setup


@pytest.mark.parametrize("bad, why", [
    ("for i in range(3):\n    assert f(i) == i", "unsupported statement"),
    ("assert f(1) == [i for i in range(3)]", "cannot judge"),
    ("x = 1", "no assert"),
    ("assert f(", "not valid Python"),
    ("def helper():\n    return 1\nassert f() == helper()", "unsupported statement"),
])
def test_parse_tests_rejects_what_it_cannot_judge(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_tests(bad)


def test_code_reward_asserts_humaneval_and_stdio():
    fence = f"Here you go:\n```python\n{MBPP_OK}\n```\nDone."
    wrong = "def remove_occ(s, ch):\n    return s.replace(ch, '', 1)"
    he_wrong = "def has_close_elements(numbers, threshold):\n    return True"
    stdio = {"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7"]}
    stdio_json = json.dumps({"inputs": ["4\n"], "outputs": ["16\n"]})
    programs = [MBPP_OK, fence, wrong, HUMANEVAL_OK, he_wrong,
                "a, b = map(int, input().split())\nprint(a + b)", "print(3)",
                "n = int(input())\nprint(n * n)   \n\n", "import sys\nn = int(input())\nprint(n * n)\nsys.exit(1)"]
    tests = [MBPP, MBPP, MBPP, HUMANEVAL, HUMANEVAL, stdio, stdio, stdio_json, stdio_json]
    assert code_reward(programs, tests) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_code_reward_comparisons_keep_python_semantics():
    tests = "assert f() == (1, 2)"
    assert code_reward(["def f():\n    return (1, 2)", "def f():\n    return [1, 2]"], [tests] * 2) == [1.0, 0.0]
    tests = "assert f() is None"
    assert code_reward(["def f():\n    pass", "def f():\n    return 0"], [tests] * 2) == [1.0, 0.0]
    tests = "assert set(f()) == {1, 2} and f() != []"
    assert code_reward(["def f():\n    return [2, 1, 1]", "def f():\n    return []"], [tests] * 2) == [1.0, 0.0]
    tests = "assert f(2) == 4.0\nassert f(-1) == 1"  # 4 == 4.0 in Python
    assert code_reward(["def f(x):\n    return x * x"], [tests]) == [1.0]


def test_expected_values_and_verdicts_stay_out_of_the_sandbox():
    # MBPP relies on the program importing math: the check is still the parent's, only the call is sent
    plan = parse_tests("assert math.isclose(volume(10), 4188.790204786391, rel_tol=0.001)")
    assert plan.calls == ["volume(10)"] and "4188" not in plan.setup
    forged = ("import math\nclass _M:\n    def __getattr__(self, n):\n        return lambda *a, **k: True\n"
              "math = _M()\ndef volume(r):\n    return 0.0")
    ok = "import math\ndef volume(r):\n    return 4 / 3 * math.pi * r ** 3"
    tests = "assert math.isclose(volume(10), 4188.790204786391, rel_tol=0.001)"
    assert code_reward([forged, ok], [tests] * 2) == [0.0, 1.0]


def test_test_variables_the_parent_cannot_compute_are_inputs_only():
    with pytest.raises(ValueError, match="cannot judge"):
        parse_tests("import string\nexpected = string.ascii_lowercase\nassert f() == expected")
    plan = parse_tests("import string\nletters = string.ascii_lowercase\nres = f(3)\n"
                       "assert count(letters) == 26\nassert res == 9")
    assert plan.calls == ["count(letters)", "res"] and "letters = string.ascii_lowercase" in plan.setup
    code = "def count(s):\n    return len(s)\ndef f(x):\n    return x * x"
    assert code_reward([code], ["import string\nletters = string.ascii_lowercase\nres = f(3)\n"
                                "assert count(letters) == 26\nassert res == 9"]) == [1.0]


def test_iterators_are_materialised_in_the_sandbox():
    tests = "assert list(map(inc, [1, 2])) == [2, 3]\nassert sorted(gen(3)) == [0, 1, 2]\nassert set(gen(2)) == {0, 1}"
    plan = parse_tests(tests)
    assert plan.calls == ["list(map(inc, [1, 2]))", "sorted(gen(3))", "set(gen(2))"]
    ok = "def inc(x):\n    return x + 1\ndef gen(n):\n    yield from reversed(range(n))"
    bad = "def inc(x):\n    return x\ndef gen(n):\n    yield from range(n)"
    assert code_reward([ok, bad], [tests] * 2) == [1.0, 0.0]


def test_code_reward_checks_its_arguments():
    with pytest.raises(ValueError, match="2 responses but 1 test"):
        code_reward(["a", "b"], ["assert f() == 1"])
    with pytest.raises(ValueError, match=r"tests\[0\]: tests: unsupported statement"):
        code_reward(["a"], ["while True:\n    pass"])
    with pytest.raises(ValueError, match="'inputs' and 'outputs'"):
        code_reward(["a"], [{"inputs": ["1"]}])
    with pytest.raises(ValueError, match="workers"):
        code_reward(["a"], ["assert f() == 1"], workers=0)
    assert code_reward([], []) == []


def test_code_reward_batch_of_64_is_fast():
    progs = [f"def f(x):\n    return x + {i}" for i in range(64)]
    tests = [f"assert f(1) == {i + 1}\nassert f(-{i}) == 0" for i in range(64)]
    code_reward(progs[:2], tests[:2])  # warm (the sandbox's one-off probe)
    t0 = time.monotonic()
    rewards = code_reward(progs, tests, workers=2)
    dt = time.monotonic() - t0
    assert rewards == [1.0] * 64
    assert dt < 30.0, f"64 programs took {dt:.1f} s"
