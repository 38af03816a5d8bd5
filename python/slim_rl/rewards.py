"""Verifiable rewards r ∈ {0, 1} (docs/objective.md, 'What one RL step trains on'): exact match, math answer
equivalence, code tests.

Every reward function takes a batch (lists) and returns a list of floats; none of them raises for
anything a model generated — a response that cannot be checked scores 0 and training carries on.
(They do raise for a malformed *dataset* entry, or when generated code cannot be isolated.)

Code rewards judge outside the candidate's process (:mod:`slim_rl.sandbox`): :func:`parse_tests` turns
``assert`` tests into the calls to make and the checks to apply, the sandbox returns only the calls'
values as plain data, and the checks are evaluated here by a small interpreter that never runs
candidate code.
"""

from __future__ import annotations

import ast
import atexit
import builtins
import functools
import json
import logging
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slim_rl.sandbox import SandboxLimits, _require, run_calls, run_python

if TYPE_CHECKING:
    import torch

__all__ = ["exact_match_reward", "math_reward", "code_reward", "truncation_mask", "parse_tests", "TestPlan",
           "REWARDS"]

log = logging.getLogger("slim_rl.rewards")


def exact_match_reward(responses: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> list[float]:
    """1.0 where the response token ids equal the answer ids exactly (both without EOS / padding)."""
    if len(responses) != len(answers):
        raise ValueError(f"exact_match_reward: {len(responses)} responses but {len(answers)} answers")
    return [1.0 if list(r) == list(a) else 0.0 for r, a in zip(responses, answers)]


# --------------------------------------------------------------------------------------------------
# math: math-verify in a worker process, killed at the timeout (works from any thread)

_MATH_WORKER = r'''
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway expression fails, not the machine
def _one(response, gold, timeout):
    from math_verify import parse, verify
    try:
        g = parse(gold if "$" in gold or "\\boxed" in gold else "$" + gold + "$", parsing_timeout=timeout)
        a = parse(response, parsing_timeout=timeout)
        if not g or not a:
            return 0.0
        return 1.0 if verify(g, a, timeout_seconds=timeout) else 0.0
    except Exception:
        return 0.0
import math_verify  # noqa: F401  (import cost paid before "ready")
out = sys.stdout
out.write("@@slim ready\n")
out.flush()
for line in sys.stdin:
    req = json.loads(line)
    score = _one(req["r"], req["g"], req["t"])
    out.write("@@slim " + json.dumps(score) + "\n")
    out.flush()
'''

_MATH_STARTUP_S = 120.0


class _MathWorker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _MATH_WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self.buf = b""
        if self._reply(_MATH_STARTUP_S) != "ready":
            self.kill()
            raise RuntimeError("math_reward: the math-verify worker did not start (is math-verify installed?)")

    def _reply(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.startswith(b"@@slim "):
                    return line[7:].decode()
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk

    def score(self, response: str, gold: str, timeout: float) -> float | None:
        """The score, or None when the worker ran past ``timeout`` (it is then dead)."""
        try:
            self.proc.stdin.write((json.dumps({"r": response, "g": gold, "t": max(1, int(timeout))}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            return None
        reply = self._reply(timeout + 1.0)
        if reply is None:
            self.kill()
            return None
        return float(json.loads(reply))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


_math_idle: list[_MathWorker] = []
_math_lock = threading.Lock()


def _math_acquire() -> _MathWorker:
    with _math_lock:
        while _math_idle:
            w = _math_idle.pop()
            if w.alive():
                return w
    return _MathWorker()


def _math_release(w: _MathWorker) -> None:
    if not w.alive():
        return
    with _math_lock:
        if len(_math_idle) < 8:
            _math_idle.append(w)
            return
    w.kill()


@atexit.register
def _math_shutdown() -> None:
    with _math_lock:
        workers = list(_math_idle)
        _math_idle.clear()
    for w in workers:
        w.kill()


def math_reward(responses: Sequence[str], answers: Sequence[str], *, timeout: float = 5) -> list[float]:
    """1.0 where the response's final answer is mathematically equivalent to the gold answer.

    Uses the ``math-verify`` package: the gold answer is parsed as LaTeX / an expression, the response's
    answer is extracted (``\\boxed{}`` first, then the last expression) and compared symbolically.
    Parsing and verification run in a worker process that is killed when one answer takes longer than
    ``timeout`` seconds (that answer scores 0), so the limit holds from any thread and for work that
    holds the GIL (e.g. ``\\boxed{9^{9^{9^{9}}}}``).
    """
    if len(responses) != len(answers):
        raise ValueError(f"math_reward: {len(responses)} responses but {len(answers)} answers")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"math_reward: timeout must be a positive number of seconds, got {timeout!r}")
    out: list[float] = []
    worker: _MathWorker | None = None
    try:
        for r, a in zip(responses, answers):
            if worker is None or not worker.alive():
                worker = _math_acquire()
            s = worker.score(str(r), str(a), float(timeout))
            out.append(0.0 if s is None else s)
    finally:
        if worker is not None:
            _math_release(worker)
    return out


# --------------------------------------------------------------------------------------------------
# code: tests → (calls, checks) parsed here, values from the sandbox, checks evaluated here

def extract_code(response: str) -> str:
    """The last fenced code block of a response (```python ... ```), or the whole text."""
    if "```" not in response:
        return response
    parts = response.split("```")
    blocks = [parts[i] for i in range(1, len(parts), 2)]
    code = blocks[-1] if blocks else response
    first, _, rest = code.partition("\n")
    return rest if first.strip().isalpha() or not first.strip() else code


class _Unsupported(ValueError):
    pass


_SAFE_FUNCS: dict[str, Any] = {f.__name__: f for f in (
    abs, len, sorted, set, frozenset, list, tuple, dict, round, min, max, sum, int, float, str, bool, all, any,
    isinstance, type, complex, divmod)}


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > _SEQ_CAP:
        raise OverflowError("range too long")
    return r


_SAFE_FUNCS["range"] = _range
_MATH_ATTRS = {"isclose", "isnan", "isinf", "isfinite", "fabs", "sqrt", "floor", "ceil", "pi", "e", "inf", "nan",
               "tau", "log", "log2", "log10", "exp", "pow", "gcd", "prod", "hypot", "trunc", "copysign"}
_BUILTIN_NAMES = frozenset(dir(builtins))
_MATERIALISE = frozenset({"list", "tuple", "set", "frozenset", "sorted", "dict"})
_SEQ_CAP = 1_000_000  # longest sequence / digit count the parent will build from a repetition or power


@dataclass
class TestPlan:
    """A test program split into what runs in the sandbox (``setup``, ``calls``) and what the parent
    checks (``checks``: assert expressions whose candidate-dependent parts are names ``_slim_r<k>``)."""

    setup: str
    calls: list[str]
    checks: list[ast.expr]
    env: dict[str, Any] = field(default_factory=dict)
    math_names: set[str] = field(default_factory=set)
    math_funcs: dict[str, str] = field(default_factory=dict)
    imported: set[str] = field(default_factory=set)
    opaque: set[str] = field(default_factory=set)  # test variables the parent cannot compute (inputs only)
    alias: str | None = None
    entry: str | None = None


class _Splitter:
    def __init__(self, plan: TestPlan, scoped: set[str] | None = None) -> None:
        self.plan = plan
        self.scoped = scoped or set()

    def known(self, name: str) -> bool:
        p = self.plan
        return name in self.scoped or name in p.env or name in _SAFE_FUNCS or name in p.math_funcs \
            or name in p.math_names

    def free_names(self, node: ast.AST) -> bool:
        """True when ``node`` names something only the program can define (not a builtin, a test import
        or assignment, or a comprehension / lambda variable): only such expressions run in the sandbox."""
        bound: set[str] = set()
        for n in ast.walk(node):
            if isinstance(n, ast.comprehension):
                bound |= {t.id for t in ast.walk(n.target) if isinstance(t, ast.Name)}
            elif isinstance(n, ast.Lambda):
                bound |= {a.arg for a in n.args.args + n.args.kwonlyargs + n.args.posonlyargs}
        p = self.plan
        return any(isinstance(n, ast.Name) and not self.known(n.id) and n.id not in bound and n.id not in p.opaque
                   and n.id not in _BUILTIN_NAMES and n.id not in p.imported for n in ast.walk(node))

    def leaf(self, node: ast.expr) -> ast.expr:
        k = len(self.plan.calls)
        self.plan.calls.append(ast.unparse(node))
        return ast.copy_location(ast.Name(f"_slim_r{k}", ast.Load()), node)

    def conv(self, node: ast.expr) -> ast.expr:
        """``node`` with every candidate-dependent maximal sub-expression replaced by a result name."""
        try:
            return self._conv(node)
        except _Unsupported:
            # a value the parent cannot compute: the sandbox computes it, unless it is a verdict
            # (comparison / boolean logic) or uses no candidate name (then it is expected data)
            if isinstance(node, (ast.Compare, ast.BoolOp)) or (
                    isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
                raise
            if not self.free_names(node):
                raise
            return self.leaf(node)

    def _conv(self, node: ast.expr) -> ast.expr:
        p = self.plan
        if isinstance(node, ast.Constant):
            return node
        if isinstance(node, ast.Name):
            if self.known(node.id):
                return node
            if self.free_names(node):
                return self.leaf(node)
            raise _Unsupported(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in p.math_names and node.attr in _MATH_ATTRS:
                return node
            if self.free_names(node):
                return self.leaf(node)
            raise _Unsupported(ast.unparse(node))
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            if any(isinstance(e, ast.Starred) for e in node.elts):
                raise _Unsupported(ast.unparse(node))
            return type(node)(elts=[self.conv(e) for e in node.elts], ctx=ast.Load()) if not isinstance(
                node, ast.Set) else ast.Set(elts=[self.conv(e) for e in node.elts])
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise _Unsupported(ast.unparse(node))
            return ast.Dict(keys=[self.conv(k) for k in node.keys], values=[self.conv(v) for v in node.values])
        if isinstance(node, ast.UnaryOp):
            return ast.UnaryOp(op=node.op, operand=self.conv(node.operand))
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, (ast.MatMult,)):
                raise _Unsupported(ast.unparse(node))
            return ast.BinOp(left=self.conv(node.left), op=node.op, right=self.conv(node.right))
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(op=node.op, values=[self.conv(v) for v in node.values])
        if isinstance(node, ast.Compare):
            return ast.Compare(left=self.conv(node.left), ops=node.ops,
                               comparators=[self.conv(c) for c in node.comparators])
        if isinstance(node, ast.IfExp):
            return ast.IfExp(test=self.conv(node.test), body=self.conv(node.body), orelse=self.conv(node.orelse))
        if isinstance(node, ast.Subscript):
            return ast.Subscript(value=self.conv(node.value), slice=self.conv(node.slice), ctx=ast.Load())
        if isinstance(node, ast.Slice):
            part = lambda x: None if x is None else self.conv(x)
            return ast.Slice(lower=part(node.lower), upper=part(node.upper), step=part(node.step))
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in _MATERIALISE and f.id not in p.env and self.free_names(node):
                # list(map(f, xs)), sorted(gen()): iterators cannot come back as data, their contents can
                return self.leaf(node)
            safe = (isinstance(f, ast.Name) and (f.id in _SAFE_FUNCS or f.id in p.math_funcs)
                    and f.id not in p.env) or (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                                               and f.value.id in p.math_names and f.attr in _MATH_ATTRS)
            if safe and not any(isinstance(a, ast.Starred) for a in node.args) and all(
                    k.arg is not None for k in node.keywords):
                return ast.Call(func=f, args=[self.conv(a) for a in node.args],
                                keywords=[ast.keyword(arg=k.arg, value=self.conv(k.value)) for k in node.keywords])
            if self.free_names(node):
                return self.leaf(node)
            raise _Unsupported(ast.unparse(node))
        raise _Unsupported(ast.unparse(node))


def _literal(plan: TestPlan, node: ast.expr) -> tuple[bool, Any]:
    """(True, value) when the parent can compute ``node`` without the candidate."""
    sp = _Splitter(plan)
    if sp.free_names(node):
        return False, None
    try:
        conv = sp._conv(node)
    except _Unsupported:
        return False, None
    try:
        return True, _evaluate(conv, plan, [])
    except Exception:  # noqa: BLE001 - e.g. 1/0 in a test: let the sandbox run it
        return False, None


@functools.lru_cache(maxsize=4096)
def parse_tests(tests: str) -> TestPlan:
    """Split an assert-style test program (MBPP ``assert f(x) == y``, HumanEval ``def check(candidate)`` +
    ``check(f)``) into a :class:`TestPlan`. Supported statements: imports, assignments, ``assert``,
    ``def check(<name>)`` holding those, ``check(<function>)``, docstrings and ``pass``.

    Raises:
        ValueError: a statement or expression form the parent cannot judge (named in the message).
    """
    if not isinstance(tests, str):
        raise TypeError(f"parse_tests: tests must be str, got {type(tests).__name__}")
    try:
        mod = ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"tests: not valid Python ({e.msg}, line {e.lineno})") from None
    # `math` is the math module for the checks even when the tests rely on the program importing it
    # (MBPP does): otherwise `math.isclose(f(x), y)` would be judged inside the sandbox
    plan = TestPlan(setup="", calls=[], checks=[], math_names={"math"})
    setup: list[tuple[str | None, str, ast.AST | None]] = []  # (assigned name or None, source, value)

    def stmt(s: ast.stmt, in_check: bool) -> None:
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            setup.append((None, ast.unparse(s), None))
            for a in s.names:
                plan.imported.add(a.asname or a.name.split(".")[0])
                if isinstance(s, ast.Import) and a.name == "math":
                    plan.math_names.add(a.asname or "math")
                elif isinstance(s, ast.ImportFrom) and s.module == "math" and a.name in _MATH_ATTRS:
                    plan.math_funcs[a.asname or a.name] = a.name
            return
        if isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name):
            name = s.targets[0].id
            ok, val = _literal(plan, s.value)
            setup.append((name, ast.unparse(s), s.value))
            plan.env.pop(name, None)
            plan.opaque.discard(name)
            if ok:
                plan.env[name] = val
            elif not _Splitter(plan).free_names(s.value):
                # e.g. `expected = string.ascii_lowercase`: fine as an input to a call, but never judged as a
                # value from the sandbox (the program could rewrite that global before it is read)
                plan.opaque.add(name)
            return
        if isinstance(s, ast.Assert):
            try:
                plan.checks.append(_Splitter(plan).conv(s.test))
            except _Unsupported as e:
                raise ValueError(f"tests: cannot judge `{ast.unparse(s.test)}` outside the program "
                                 f"(`{e}` uses no function of the program and is not plain data)") from None
            return
        if isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
            return
        if not in_check and isinstance(s, ast.FunctionDef) and s.name == "check" and len(s.args.args) == 1 \
                and not s.decorator_list:
            plan.alias = s.args.args[0].arg
            for t in s.body:
                stmt(t, True)
            return
        if (not in_check and isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
                and isinstance(s.value.func, ast.Name) and s.value.func.id == "check" and len(s.value.args) == 1
                and isinstance(s.value.args[0], ast.Name) and not s.value.keywords):
            plan.entry = s.value.args[0].id
            return
        raise ValueError(f"tests: unsupported statement `{ast.unparse(s).splitlines()[0][:80]}` (line {s.lineno}): "
                         "only imports, assignments, asserts and def check(candidate) are judged")

    for s in mod.body:
        stmt(s, False)
    if not plan.checks:
        raise ValueError("tests: no assert to judge")
    if plan.alias and plan.alias in plan.env:
        raise ValueError(f"tests: check's parameter {plan.alias!r} is also assigned")
    # only the assignments the calls use go into the sandbox: expected values stay out of it
    names = lambda tree: {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    needed: set[str] = set()
    for c in plan.calls:
        needed |= names(ast.parse(c, mode="eval"))
    keep = [False] * len(setup)
    for j in range(len(setup) - 1, -1, -1):
        name, _, value = setup[j]
        if name is None or name in needed:
            keep[j] = True
            if name is not None:
                needed.discard(name)
                needed |= names(value)
    plan.setup = "\n".join(src for (_, src, _), k in zip(setup, keep) if k)
    return plan


def _guard_size(v: Any) -> Any:
    if isinstance(v, (str, bytes, list, tuple)) and len(v) > _SEQ_CAP:
        raise OverflowError("value too large")
    return v


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
    if isinstance(op, ast.Pow):
        if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and b * math.log2(abs(a)) > 3 * _SEQ_CAP:
            raise OverflowError("power too large")
        return a ** b
    if isinstance(op, ast.Mult):
        for x, y in ((a, b), (b, a)):
            if isinstance(x, (str, bytes, list, tuple)) and isinstance(y, int) and len(x) * max(y, 0) > _SEQ_CAP:
                raise OverflowError("repetition too large")
    if isinstance(op, ast.LShift) and isinstance(b, int) and b > 3 * _SEQ_CAP:
        raise OverflowError("shift too large")
    ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b,
           ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b, ast.LShift: lambda: a << b,
           ast.RShift: lambda: a >> b, ast.BitOr: lambda: a | b, ast.BitAnd: lambda: a & b,
           ast.BitXor: lambda: a ^ b}
    if isinstance(op, ast.Mod) and isinstance(a, (str, bytes)):
        raise TypeError("% formatting is not evaluated")
    return _guard_size(ops[type(op)]())


def _compare(op: ast.cmpop, a: Any, b: Any) -> bool:
    if isinstance(op, ast.Is):
        return a is b if (a is None or b is None or isinstance(a, bool) or isinstance(b, bool)) else False
    if isinstance(op, ast.IsNot):
        return not _compare(ast.Is(), a, b)
    return {ast.Eq: lambda: a == b, ast.NotEq: lambda: a != b, ast.Lt: lambda: a < b, ast.LtE: lambda: a <= b,
            ast.Gt: lambda: a > b, ast.GtE: lambda: a >= b, ast.In: lambda: a in b,
            ast.NotIn: lambda: a not in b}[type(op)]()


def _evaluate(node: ast.expr, plan: TestPlan, results: list[Any]) -> Any:
    """Evaluate a converted check on plain data (no candidate object ever reaches here)."""
    ev = lambda n: _evaluate(n, plan, results)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id.startswith("_slim_r"):
            return results[int(node.id[7:])]
        if node.id in plan.env:
            return plan.env[node.id]
        if node.id in plan.math_funcs:
            return getattr(math, plan.math_funcs[node.id])
        return _SAFE_FUNCS[node.id]
    if isinstance(node, ast.Attribute):
        return getattr(math, node.attr)
    if isinstance(node, ast.List):
        return [ev(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(ev(e) for e in node.elts)
    if isinstance(node, ast.Set):
        return {ev(e) for e in node.elts}
    if isinstance(node, ast.Dict):
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        v = ev(node.operand)
        return {ast.Not: lambda: not v, ast.USub: lambda: -v, ast.UAdd: lambda: +v,
                ast.Invert: lambda: ~v}[type(node.op)]()
    if isinstance(node, ast.BinOp):
        return _binop(node.op, ev(node.left), ev(node.right))
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            v: Any = True
            for x in node.values:
                v = ev(x)
                if not v:
                    return v
            return v
        v = False
        for x in node.values:
            v = ev(x)
            if v:
                return v
        return v
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, c in zip(node.ops, node.comparators):
            right = ev(c)
            if not _compare(op, left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return ev(node.body) if ev(node.test) else ev(node.orelse)
    if isinstance(node, ast.Subscript):
        return ev(node.value)[ev(node.slice)]
    if isinstance(node, ast.Slice):
        part = lambda x: None if x is None else ev(x)
        return slice(part(node.lower), part(node.upper), part(node.step))
    if isinstance(node, ast.Call):
        f = ev(node.func)
        args = [ev(a) for a in node.args]
        kw = {k.arg: ev(k.value) for k in node.keywords}
        if f is str and args and isinstance(args[0], int) and abs(args[0]) > 10 ** 4000:
            raise OverflowError("int too large")
        return _guard_size(f(*args, **kw))
    raise TypeError(f"cannot evaluate {type(node).__name__}")


def _stdio_cases(tests: Any) -> list[tuple[str, str]] | None:
    """``{"inputs": [...], "outputs": [...]}`` (or that as a JSON string) → [(stdin, expected stdout)]."""
    obj = tests
    if isinstance(tests, str):
        t = tests.lstrip()
        if not t.startswith("{"):
            return None
        try:
            obj = json.loads(t)
        except ValueError:
            return None
    if not isinstance(obj, Mapping) or "inputs" not in obj or "outputs" not in obj:
        if isinstance(tests, str):
            return None
        raise ValueError("tests: a mapping needs 'inputs' and 'outputs' lists (stdin/stdout cases)")
    ins, outs = obj["inputs"], obj["outputs"]
    if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs) or not ins:
        raise ValueError("tests: 'inputs' and 'outputs' must be non-empty lists of the same length")
    if not all(isinstance(x, str) for x in ins + outs):
        raise ValueError("tests: stdin/stdout cases must be strings")
    return list(zip(ins, outs))


def _normalise_output(s: str) -> list[str]:
    lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _judge_asserts(code: str, plan: TestPlan, entry: str | None, limits: SandboxLimits | None,
                   unsandboxed: bool | None) -> float:
    res = run_calls(code, plan.calls, setup=plan.setup, alias=plan.alias, entry=entry or plan.entry,
                    limits=limits, unsandboxed=unsandboxed)
    if not res.complete:
        return 0.0
    if not all(res.ok):
        # an exception in a call is a failed assert (Python would have raised there)
        return 0.0
    for check in plan.checks:
        try:
            if not _evaluate(check, plan, res.values):
                return 0.0
        except Exception:  # noqa: BLE001 - e.g. comparing unorderable values: the assert would have raised
            return 0.0
    return 1.0


def _judge_stdio(code: str, cases: list[tuple[str, str]], limits: SandboxLimits | None,
                 unsandboxed: bool | None) -> float:
    for stdin, expected in cases:
        r = run_python(code, stdin=stdin, limits=limits, unsandboxed=unsandboxed)
        if not r.passed or _normalise_output(r.stdout) != _normalise_output(expected):
            return 0.0
    return 1.0


def code_reward(responses: Sequence[str], tests: Sequence[str | Mapping[str, Any]], *,
                limits: SandboxLimits | None = None, workers: int = 2, entry_points: Sequence[str | None] | None = None,
                unsandboxed: bool | None = None) -> list[float]:
    """1.0 where the response's code passes its tests, judged outside the sandboxed program.

    ``tests[i]`` is either assert-style Python (see :func:`parse_tests`; the asserts never run in the
    program's process: only their calls do, and their values are compared here) or stdin/stdout cases
    ``{"inputs": [...], "outputs": [...]}`` (a mapping or its JSON text; outputs compared line by line,
    trailing whitespace ignored). ``entry_points[i]`` names the function HumanEval's ``candidate`` refers
    to (default: the test's ``check(<name>)`` call, else the program's last function).
    ``unsandboxed`` (default: env ``SLIM_RL_UNSANDBOXED``) allows running without isolation *only* where
    no sandbox works, with a warning in the log.

    Raises:
        ValueError: mismatched lengths or a test the parent cannot judge.
        slim_rl.sandbox.SandboxUnavailable: generated code cannot be isolated here.
    """
    if len(responses) != len(tests):
        raise ValueError(f"code_reward: {len(responses)} responses but {len(tests)} test programs")
    if entry_points is not None and len(entry_points) != len(responses):
        raise ValueError(f"code_reward: {len(responses)} responses but {len(entry_points)} entry_points")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"code_reward: workers must be a positive int, got {workers!r}")
    jobs: list[tuple[str, Any]] = []
    for i, t in enumerate(tests):
        cases = _stdio_cases(t)
        if cases is not None:
            jobs.append(("stdio", cases))
        elif isinstance(t, str):
            try:
                jobs.append(("asserts", parse_tests(t)))
            except ValueError as e:
                raise ValueError(f"code_reward: tests[{i}]: {e}") from None
        else:
            raise ValueError(f"code_reward: tests[{i}] must be a str or a mapping, got {type(t).__name__}")
    if not responses:
        return []
    _require(unsandboxed)  # raises SandboxUnavailable before any work

    def one(i: int) -> float:
        code = extract_code(responses[i]) if isinstance(responses[i], str) else ""
        kind, spec = jobs[i]
        try:
            if kind == "stdio":
                return _judge_stdio(code, spec, limits, unsandboxed)
            return _judge_asserts(code, spec, entry_points[i] if entry_points else None, limits, unsandboxed)
        except OSError as e:  # the machinery failed (e.g. out of fds): log it, score 0, carry on
            log.warning("code_reward: could not judge response %d: %s", i, e)
            return 0.0

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(responses))))


def truncation_mask(response_len: torch.Tensor, max_tokens: int, *, margin: int = 5) -> torch.Tensor:
    """True for responses that count as truncated (length ≥ max_tokens − margin); they get r = 0."""
    return response_len >= max_tokens - margin


REWARDS = {"exact": exact_match_reward, "math": math_reward, "code": code_reward}
