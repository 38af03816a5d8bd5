"""Verifiable rewards r ∈ {0, 1} (SPEC §4.1): exact match, math answer equivalence, code tests.

Every reward function takes a batch (lists) and returns a list of floats; none of them raises for
anything a model generated — a response that cannot be checked scores 0 and training carries on.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from slim_rl.sandbox import SandboxLimits, run_python

__all__ = ["exact_match_reward", "math_reward", "code_reward", "truncation_mask", "REWARDS"]


def exact_match_reward(responses: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> list[float]:
    """1.0 where the response token ids equal the answer ids exactly (both without EOS / padding)."""
    if len(responses) != len(answers):
        raise ValueError(f"exact_match_reward: {len(responses)} responses but {len(answers)} answers")
    return [1.0 if list(r) == list(a) else 0.0 for r, a in zip(responses, answers)]


def _math_one(response: str, gold: str, timeout: int) -> float:
    from math_verify import parse, verify

    # math-verify's own timeouts use SIGALRM, which only works in the main thread
    main = threading.current_thread() is threading.main_thread()
    try:
        g = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$",
                  parsing_timeout=timeout if main else None)
        a = parse(response, parsing_timeout=timeout if main else None)
        if not g or not a:
            return 0.0
        return 1.0 if verify(g, a, timeout_seconds=timeout if main else None) else 0.0
    except Exception:  # noqa: BLE001 - anything unparsable scores 0
        return 0.0


def math_reward(responses: Sequence[str], answers: Sequence[str], *, timeout: int = 5) -> list[float]:
    """1.0 where the response's final answer is mathematically equivalent to the gold answer.

    Uses the ``math-verify`` package: the gold answer is parsed as LaTeX / an expression, the response's
    answer is extracted (``\\boxed{}`` first, then the last expression) and compared symbolically.
    """
    if len(responses) != len(answers):
        raise ValueError(f"math_reward: {len(responses)} responses but {len(answers)} answers")
    return [_math_one(r, str(a), timeout) for r, a in zip(responses, answers)]


def extract_code(response: str) -> str:
    """The last fenced code block of a response (```python ... ```), or the whole text."""
    if "```" not in response:
        return response
    parts = response.split("```")
    blocks = [parts[i] for i in range(1, len(parts), 2)]
    code = blocks[-1] if blocks else response
    first, _, rest = code.partition("\n")
    return rest if first.strip().isalpha() or not first.strip() else code


def code_reward(responses: Sequence[str], tests: Sequence[str], *, limits: SandboxLimits | None = None,
                workers: int = 2) -> list[float]:
    """1.0 where the response's code passes its tests in the sandbox (:mod:`slim_rl.sandbox`).

    ``tests[i]`` is Python appended after the extracted code (e.g. asserts). Programs that loop, fork,
    allocate without bound, write outside their directory or open sockets are stopped and score 0.
    """
    if len(responses) != len(tests):
        raise ValueError(f"code_reward: {len(responses)} responses but {len(tests)} test programs")

    def one(i: int) -> float:
        try:
            res = run_python(extract_code(responses[i]), tests=tests[i], limits=limits)
            return 1.0 if res.passed else 0.0
        except Exception:  # noqa: BLE001 - the trainer carries on
            return 0.0

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, range(len(responses))))


def truncation_mask(response_len: torch.Tensor, max_tokens: int, *, margin: int = 5) -> torch.Tensor:
    """True for responses that count as truncated (length ≥ max_tokens − margin); they get r = 0."""
    return response_len >= max_tokens - margin


REWARDS = {"exact": exact_match_reward, "math": math_reward, "code": code_reward}
