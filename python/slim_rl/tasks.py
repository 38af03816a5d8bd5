"""Tasks with verifiable answers: the embedded synthetic addition task and a JSONL math/code task.

A task hands out :class:`Example` s (prompt token ids + what the reward needs) and scores responses
(lists of token ids, the EOS already cut off) with a reward in {0, 1}.

The embedded demo task (:class:`AdditionTask`) is two-operand addition written in a 16-token
vocabulary. Its supervised demonstrations come from a *flawed demonstrator*: on problems with a carry
it forgets the carries with probability ``demo_error`` (writing the digit-wise sum mod 10), otherwise
it is right. A model fitted to these demonstrations is right on carry-free problems and usually wrong
on the others, yet it still samples the right answer with probability ≈ 1 − ``demo_error`` — exactly
the situation reinforcement learning with a verifiable reward can fix, and a clean test of it.

The block-size task family (:class:`ShiftTask`) has long answers in the same vocabulary: ``n`` digits
and a shift ``k`` → the ``n`` digits each shifted by ``k`` (mod 10), written out digit by digit, then
EOS (``n`` = 20: a 21-token response, two blocks at K = 16, three at K = 8). Its flawed demonstrator
shifts the wrong way (−k instead of +k) on large shifts (k ≥ ``flaw_from``, except k = 5 where both
directions agree) with probability ``demo_error``; a fitted model is right on small shifts and
usually wrong on large ones, while a sample is right on them with probability ≈ 1 − ``demo_error`` only
when all ``n`` digits agree on the direction — which parallel decoding of a whole block makes harder
as K grows.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence

import torch

from slim_rl.rewards import exact_match_reward

__all__ = ["Example", "AdditionTask", "ShiftTask", "JsonlTask", "make_task"]


@dataclasses.dataclass
class Example:
    """One prompt: token ids, the reference answer (ids or text) and optional test code."""

    prompt: list[int]
    answer: list[int] | str
    tests: str = ""
    uid: int = 0


def _answer_reward(responses: Sequence[Sequence[int]], examples: Sequence[Example], eos_id: int) -> list[float]:
    """Exact match of each response, one trailing EOS removed, with its example's answer ids."""
    stripped = []
    for r in responses:
        r = [int(t) for t in r]
        stripped.append(r[:-1] if r and r[-1] == eos_id else r)
    return exact_match_reward(stripped, [ex.answer for ex in examples])


class AdditionTask:
    """``a+b=`` → the sum with a fixed number of digits (leading zeros), then EOS.

    Vocabulary (``vocab_size`` = 16): digits 0–9 are ids 0–9, ``+`` = 10, ``=`` = 11, 12 unused,
    pad = 13, eos = 14, mask = 15 (the defaults of :func:`slim_rl.models.tiny`).
    Operands have ``digits`` digits (leading zeros allowed), the answer ``digits + 1`` digits.
    ``num_eval`` problems, fixed by ``seed``, are held out of every training sample.
    """

    name = "addition"
    vocab_size = 16
    plus, equals = 10, 11
    pad_id, eos_id, mask_id = 13, 14, 15

    def __init__(self, digits: int = 2, demo_error: float = 0.6, num_eval: int = 200, seed: int = 0):
        if digits < 1 or digits > 4:
            raise ValueError(f"digits must be in 1..4, got {digits}")
        if not 0.0 <= demo_error <= 1.0:
            raise ValueError(f"demo_error must be in [0, 1], got {demo_error}")
        self.digits = digits
        self.demo_error = demo_error
        n = 10 ** digits
        if not 0 < num_eval < n * n // 2:
            raise ValueError(f"num_eval must be in 1..{n * n // 2 - 1}, got {num_eval}")
        pairs = list(range(n * n))
        random.Random(seed).shuffle(pairs)
        self._eval = sorted(pairs[:num_eval])
        self._train = pairs[num_eval:]
        self.max_answer_len = digits + 2  # digits + 1, then EOS

    # -- encoding
    def _num(self, x: int, width: int) -> list[int]:
        return [int(c) for c in str(x).zfill(width)]

    def prompt_ids(self, a: int, b: int) -> list[int]:
        return self._num(a, self.digits) + [self.plus] + self._num(b, self.digits) + [self.equals]

    def answer_ids(self, a: int, b: int) -> list[int]:
        return self._num(a + b, self.digits + 1)

    def flawed_answer_ids(self, a: int, b: int) -> list[int]:
        """The demonstrator's mistake: digit-wise sum mod 10, carries forgotten."""
        da, db = self._num(a, self.digits), self._num(b, self.digits)
        return [0] + [(x + y) % 10 for x, y in zip(da, db)]

    def has_carry(self, a: int, b: int) -> bool:
        return self.answer_ids(a, b) != self.flawed_answer_ids(a, b)

    def decode(self, ids: Sequence[int]) -> str:
        table = {self.plus: "+", self.equals: "=", self.pad_id: "_", self.eos_id: "$", self.mask_id: "?"}
        return "".join(table.get(int(i), str(int(i)) if int(i) < 10 else f"<{int(i)}>") for i in ids)

    def _example(self, k: int) -> Example:
        n = 10 ** self.digits
        a, b = divmod(k, n)
        return Example(self.prompt_ids(a, b), self.answer_ids(a, b), uid=k)

    # -- data
    def sample(self, n: int, rng: random.Random) -> list[Example]:
        """``n`` training prompts (uniform over the non-held-out problems)."""
        return [self._example(rng.choice(self._train)) for _ in range(n)]

    def demonstrations(self, n: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
        """``n`` (prompt, demonstrated response + EOS) pairs from the flawed demonstrator."""
        out = []
        for _ in range(n):
            k = rng.choice(self._train)
            a, b = divmod(k, 10 ** self.digits)
            ans = self.flawed_answer_ids(a, b) if rng.random() < self.demo_error else self.answer_ids(a, b)
            out.append((self.prompt_ids(a, b), ans + [self.eos_id]))
        return out

    def eval_set(self) -> list[Example]:
        return [self._example(k) for k in self._eval]

    def reward(self, responses: Sequence[Sequence[int]], examples: Sequence[Example]) -> list[float]:
        """Exact match of the response (EOS removed) with the answer digits."""
        return _answer_reward(responses, examples, self.eos_id)

    def carry_fraction(self, examples: Sequence[Example]) -> float:
        n = 10 ** self.digits
        return sum(self.has_carry(*divmod(e.uid, n)) for e in examples) / max(len(examples), 1)


class ShiftTask:
    """``d_1 … d_n + k =`` → ``(d_1 + k) mod 10 … (d_n + k) mod 10``, then EOS.

    Vocabulary: :class:`AdditionTask`'s 16 ids (digits 0–9, ``+`` = 10, ``=`` = 11, pad = 13, eos = 14,
    mask = 15). ``n`` = ``length`` digits (uniform), shift k uniform in 1..9. ``num_eval`` problems,
    drawn with ``seed``, are held out of every training sample (training draws that hit one are
    redrawn). The flawed demonstrator writes ``(d_i − k) mod 10`` with probability ``demo_error`` when
    k ≥ ``flaw_from`` (k ≠ 5).
    """

    name = "shift"
    vocab_size = 16
    plus, equals = 10, 11
    pad_id, eos_id, mask_id = 13, 14, 15

    def __init__(self, length: int = 20, demo_error: float = 0.7, flaw_from: int = 3, num_eval: int = 200,
                 seed: int = 0):
        if isinstance(length, bool) or not isinstance(length, int) or not 4 <= length <= 64:
            raise ValueError(f"length must be an int in 4..64, got {length!r}")
        if not 0.0 <= demo_error <= 1.0:
            raise ValueError(f"demo_error must be in [0, 1], got {demo_error}")
        if isinstance(flaw_from, bool) or not isinstance(flaw_from, int) or not 1 <= flaw_from <= 10:
            raise ValueError(f"flaw_from must be an int in 1..10 (10: no flaw), got {flaw_from!r}")
        if isinstance(num_eval, bool) or not isinstance(num_eval, int) or not 1 <= num_eval <= 100_000:
            raise ValueError(f"num_eval must be an int in 1..100000, got {num_eval!r}")
        self.length, self.demo_error, self.flaw_from = length, demo_error, flaw_from
        self.max_answer_len = length + 1  # the digits, then EOS
        # demonstrations repeat EOS up to the next multiple of 16 tokens: masked-diffusion SFT then never
        # shows the model pad tokens inside the answer's last block (at generation those slots are masks,
        # and visible pads would give the answer's end away); the decoder cuts at the first EOS
        self._eos_run = -(-(length + 1) // 16) * 16 - length
        rng = random.Random(seed)
        seen: set[tuple[int, ...]] = set()
        self._eval: list[tuple[int, ...]] = []
        while len(self._eval) < num_eval:
            p = self._draw(rng)
            if p not in seen:
                seen.add(p)
                self._eval.append(p)
        self._held_out = seen

    def _draw(self, rng: random.Random) -> tuple[int, ...]:
        """A problem: (d_1, …, d_n, k)."""
        return tuple(rng.randrange(10) for _ in range(self.length)) + (rng.randrange(1, 10),)

    def _train_problem(self, rng: random.Random) -> tuple[int, ...]:
        while True:
            p = self._draw(rng)
            if p not in self._held_out:
                return p

    # -- encoding
    def prompt_ids(self, p: Sequence[int]) -> list[int]:
        return list(p[:-1]) + [self.plus, p[-1], self.equals]

    def answer_ids(self, p: Sequence[int]) -> list[int]:
        k = p[-1]
        return [(d + k) % 10 for d in p[:-1]]

    def flawed_answer_ids(self, p: Sequence[int]) -> list[int]:
        """The demonstrator's mistake: shifted the wrong way."""
        k = p[-1]
        return [(d - k) % 10 for d in p[:-1]]

    def is_flawed(self, p: Sequence[int]) -> bool:
        """Whether the demonstrator may err on problem ``p`` (a large shift whose two directions differ)."""
        return p[-1] >= self.flaw_from and p[-1] != 5

    def decode(self, ids: Sequence[int]) -> str:
        table = {self.plus: "+", self.equals: "=", self.pad_id: "_", self.eos_id: "$", self.mask_id: "?"}
        return "".join(table.get(int(i), str(int(i)) if int(i) < 10 else f"<{int(i)}>") for i in ids)

    def _example(self, p: tuple[int, ...], uid: int) -> Example:
        return Example(self.prompt_ids(p), self.answer_ids(p), uid=uid)

    # -- data
    def sample(self, n: int, rng: random.Random) -> list[Example]:
        """``n`` training prompts (uniform, held-out problems excluded)."""
        out = []
        for _ in range(n):
            p = self._train_problem(rng)
            out.append(self._example(p, hash_problem(p)))
        return out

    def demonstrations(self, n: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
        """``n`` (prompt, demonstrated response + EOS, repeated up to a multiple of 16 tokens) pairs from the
        flawed demonstrator."""
        out = []
        for _ in range(n):
            p = self._train_problem(rng)
            wrong = self.is_flawed(p) and rng.random() < self.demo_error
            ans = self.flawed_answer_ids(p) if wrong else self.answer_ids(p)
            out.append((self.prompt_ids(p), ans + [self.eos_id] * self._eos_run))
        return out

    def eval_set(self) -> list[Example]:
        return [self._example(p, i) for i, p in enumerate(self._eval)]

    def reward(self, responses: Sequence[Sequence[int]], examples: Sequence[Example]) -> list[float]:
        """Exact match of the response (EOS removed) with the answer digits."""
        return _answer_reward(responses, examples, self.eos_id)

    def flawed_fraction(self, examples: Sequence[Example]) -> float:
        """Share of ``examples`` on which the demonstrator may err (k read from the prompt)."""
        return sum(self.is_flawed([e.prompt[-2]]) for e in examples) / max(len(examples), 1)


def hash_problem(p: Sequence[int]) -> int:
    """A stable 62-bit id of a problem tuple (FNV-1a over its digits)."""
    h = 1469598103934665603
    for d in p:
        h = ((h ^ (int(d) + 1)) * 1099511628211) % (1 << 62)
    return h


class JsonlTask:
    """Prompts and answers from a JSONL file (``{"prompt": ..., "answer": ...}`` or ``"tests"`` for code),
    tokenised with a local Hugging Face tokenizer; rewards through ``math-verify`` or the code sandbox."""

    name = "jsonl"

    def __init__(self, path: str, tokenizer_path: str, *, reward: str = "math", num_eval: int = 64,
                 chat_template: bool = True, seed: int = 0):
        from transformers import AutoTokenizer

        if reward not in ("math", "code"):
            raise ValueError(f"reward must be 'math' or 'code', got {reward!r}")
        self.tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        self.kind = reward
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError(f"{path}: no examples")
        exs = []
        for i, r in enumerate(rows):
            text = r["prompt"]
            if chat_template and getattr(self.tok, "chat_template", None):
                text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            exs.append(Example(ids, str(r.get("answer", "")), r.get("tests", ""), uid=i))
        random.Random(seed).shuffle(exs)
        self._eval, self._train = exs[:num_eval], exs[num_eval:] or exs

    def sample(self, n: int, rng: random.Random) -> list[Example]:
        return [rng.choice(self._train) for _ in range(n)]

    def eval_set(self) -> list[Example]:
        return list(self._eval)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def reward(self, responses: Sequence[Sequence[int]], examples: Sequence[Example]) -> list[float]:
        from slim_rl.rewards import code_reward, math_reward

        texts = [self.decode(r) for r in responses]
        if self.kind == "math":
            return math_reward(texts, [str(e.answer) for e in examples])
        return code_reward(texts, [e.tests for e in examples])


def make_task(cfg) -> AdditionTask | ShiftTask | JsonlTask:
    """Build the task a :class:`slim_rl.config.TaskConfig` describes."""
    if cfg.name == "addition":
        return AdditionTask(digits=cfg.digits, demo_error=cfg.demo_error, num_eval=cfg.num_eval,
                            seed=cfg.seed)
    if cfg.name == "shift":
        return ShiftTask(length=cfg.length, demo_error=cfg.demo_error, flaw_from=cfg.flaw_from,
                         num_eval=cfg.num_eval, seed=cfg.seed)
    if cfg.name == "jsonl":
        return JsonlTask(cfg.path, cfg.tokenizer, reward=cfg.reward, num_eval=cfg.num_eval, seed=cfg.seed)
    raise ValueError(f"unknown task {cfg.name!r}: expected 'addition', 'shift' or 'jsonl'")


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists → (ids [B, L0] int64, pad [B, L0] bool)."""
    L0 = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L0), pad_id, dtype=torch.int64)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, L0 - len(s):] = torch.as_tensor(list(s), dtype=torch.int64)
    lens = torch.tensor([len(s) for s in seqs])
    pad = torch.arange(L0)[None, :] < (L0 - lens)[:, None]
    return ids, pad


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists → (ids [B, L1] int64, lengths [B] int64)."""
    L1 = length if length is not None else max(max((len(s) for s in seqs), default=1), 1)
    ids = torch.full((len(seqs), L1), pad_id, dtype=torch.int64)
    for i, s in enumerate(seqs):
        s = list(s)[:L1]
        if s:
            ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.int64)
    return ids, torch.tensor([min(len(s), L1) for s in seqs], dtype=torch.int64)
