"""Rewards: exact match, math-verify equivalence, truncation rule."""

from __future__ import annotations

import pytest
import torch

from slim_rl.rewards import exact_match_reward, extract_code, math_reward, truncation_mask


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
