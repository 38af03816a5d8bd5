"""Block-diffusion generation engine for SDAR-, LLaDA- and Dream-style models (docs/decode.md, docs/attention.md).

One batched driver for the three families (see :mod:`slim_rl.models` for the ``family`` / ``shift``
attributes it reads):

* **SDAR** (``model.block_causal``): the left-padded prompts are prefilled once with the staircase
  layout (prompt blocks right-aligned to the prompt end, docs/attention.md, 'The training layout'); each response block
  is denoised against the KV cache of everything before it (decode layout, docs/attention.md, 'The four layouts':
  the block attends to the whole cache and bidirectionally to itself). The K/V appended by a denoising forward are
  cropped off again; when the block is complete one "save" forward appends its final K/V. With
  ``use_cache=False`` every step recomputes the whole prefix with the staircase layout instead (same
  function, used to check the cache). The rows of a batch decode a block in lockstep (the cache
  columns stay aligned): a block takes as many forwards as its slowest row needs.
* **LLaDA / Dream**, ``cache="none"`` (exact): every step runs the whole canvas ``[prompt ‖ L1 response
  slots]`` with bidirectional attention (prompt pads hidden) and reads the K logit rows of the current block.
  Dream's one-position shift is handled in one place (the logit rows read for the slots are
  ``slots − shift``: row ``j − 1`` scores slot ``j``). Rows advance through their blocks independently
  (one canvas forward per step for the whole batch, whatever block each row is in; a row's floor f_j
  counts its own steps in its current block), so the batch needs max_r NFE_r forwards.
* **LLaDA / Dream**, ``cache="prefix"`` / ``"dual"`` (Fast-dLLM's caches, approximate): the rows decode a
  block in lockstep. The first step of each block runs the whole canvas (exactly the ``cache="none"``
  forward: the *refresh*) and keeps its K/V: of the prefix before the block's query window (``"prefix"``),
  or of everything outside the window (``"dual"``: prefix and the all-μ suffix). The block's other steps
  run only the window (``"prefix"``: the block and everything after it; ``"dual"``: the block alone) against
  those cached K/V, which are stale as soon as the block changes (a bidirectional model's prefix K/V depend
  on the block), hence approximate. The window starts ``shift`` positions early (Dream reads row
  ``j − 1`` for slot ``j``). Finished rows leave the batch once per block.

Response blocks start at the prompt end (docs/attention.md, 'The training layout'): block ``b`` holds response tokens
``[b·K, (b+1)·K)``; ``⌈max_new_tokens/K⌉`` blocks are decoded and the output is cut at
``max_new_tokens`` and after the first EOS. Each step turns the block's logits into tokens and
confidences and commits a subset with :func:`slim_ops.tau_budget_step` (τ-budget, threshold or top-k
rule) using the static floor ``f_j = ⌊K/S⌋ + [j < K mod S]`` of docs/decode.md, 'The τ-budget rule' (so a block is
always complete after ``S = steps_per_block`` steps).

Batching: prompts of different lengths are left-padded (pad keys hidden, RoPE positions count only
real tokens, so a batched row computes exactly what it computes alone). Everything inside a block
stays on the device; the host looks at the device once per block (SDAR) or once per S steps
(LLaDA / Dream) to drop the rows that are finished (produced EOS; their cache rows go too) and, to stop
early once every row is complete, at a flag one step old (on CUDA it waits for step ``j−1`` while step
``j`` is already queued, so the queue is never drained; at most one extra no-op forward per stop).

Options from the peers: the selection rules of :func:`slim_ops.tau_budget_step` (``entropy_bounded`` with
``gamma``, ``factor`` with ``factor``, ``random``; see ``slim_ops.ops.tau_budget.reference``),
``suppress_ids`` (their logits are −∞ before the step, as the mask token's: LLaDA's ``logits_eos_inf``),
``defer_ids`` (slots predicting them get confidence 0: committed only when the floor needs them; LLaDA's
``confidence_eos_eot_inf``) and ``cfg_scale`` (LLaDA's classifier-free guidance for LLaDA / Dream: a second
forward on the canvas with the prompt's tokens replaced by μ, logits ``u + (s + 1)(c − u)``).

Metrics are recorded on the device per row and per *row step* (a row's own denoising steps, counted
across blocks; steps in which the row's block was already complete are not counted): ``step_map``,
``commits``, ``ewc`` (expected wrong commits Σ_{j∈C}(1 − c_j)), ``nfe``.

The module itself is callable: ``import slim_rl.generate; slim_rl.generate(model, prompts, ...)`` is
:func:`generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
from collections.abc import Sequence

import torch

from slim_rl.models import model_info

STRATEGIES = ("tau_budget", "threshold", "topk", "entropy_bounded", "factor", "random")
CACHES = ("none", "prefix", "dual")

__all__ = ["GenerateOutput", "generate", "STRATEGIES", "CACHES"]


@dataclasses.dataclass
class GenerateOutput:
    """Result of :func:`generate` for B prompts (row i = prompt i, in input order).

    Per prompt (lists of 1D CPU tensors, response cut at ``max_new_tokens`` and after the first EOS,
    the EOS included):
        sequences: int64 response token ids.
        step_map: int32, the row step (0-based, counted over the row's denoising steps across blocks)
            at which each token was committed.
        confidence: fp32, the confidence c_j the token had when it was committed.
    Per row, over the whole decoded canvas of ``L1 = ⌈max_new_tokens/K⌉·K`` slots (CPU tensors):
        tokens: int64 [B, L1] every committed token (``pad_id`` in blocks never decoded because the row
            had already finished).
        full_step_map: int32 [B, L1] (−1 where not decoded). full_confidence: fp32 [B, L1] (NaN there).
        commits: int32 [B, S_max] |C| at each row step (0 past the row's last step), S_max = nb·S.
        ewc: fp32 [B, S_max] Σ_{j∈C}(1 − c_j) at each row step.
        nfe: int64 [B] denoising forwards each row took (= its number of row steps).
        finished: bool [B] the row produced EOS within its first ``max_new_tokens`` tokens.
        prompt_lengths: int64 [B].
    Totals:
        model_calls: batched forward passes run (prefill, denoising steps and cache-save passes).
        forward_tokens: token positions those forwards processed (Σ batch·length; compute proxy).
    """

    sequences: list[torch.Tensor]
    step_map: list[torch.Tensor]
    confidence: list[torch.Tensor]
    tokens: torch.Tensor
    full_step_map: torch.Tensor
    full_confidence: torch.Tensor
    commits: torch.Tensor
    ewc: torch.Tensor
    nfe: torch.Tensor
    finished: torch.Tensor
    prompt_lengths: torch.Tensor
    block_size: int
    steps_per_block: int
    model_calls: int = 0
    forward_tokens: int = 0

    @property
    def num_generated(self) -> int:
        """Σ committed tokens over all rows (including tokens after EOS inside the last block)."""
        return int(self.commits.sum())

    @property
    def tokens_per_forward(self) -> float:
        """Committed tokens per denoising forward, Σ_rows commits / Σ_rows nfe."""
        n = int(self.nfe.sum())
        return self.num_generated / n if n else float("nan")

    @property
    def nfe_per_token(self) -> float:
        """Σ nfe / Σ committed tokens (the inverse of :attr:`tokens_per_forward`)."""
        g = self.num_generated
        return int(self.nfe.sum()) / g if g else float("nan")

    def _valid_steps(self) -> torch.Tensor:
        s = torch.arange(self.commits.shape[1])
        return s[None, :] < self.nfe[:, None]

    @property
    def commits_histogram(self) -> torch.Tensor:
        """int64 [K+1]: number of row steps that committed 0, 1, …, K tokens."""
        vals = self.commits[self._valid_steps()].to(torch.int64)
        return torch.bincount(vals, minlength=self.block_size + 1)

    @property
    def mean_ewc(self) -> float:
        """Mean expected wrong commits per row step (the paper's Figure 5 quantity)."""
        v = self._valid_steps()
        n = int(v.sum())
        return float(self.ewc[v].double().sum() / n) if n else float("nan")

    @property
    def mean_commits(self) -> float:
        """Mean |C| per row step (= :attr:`tokens_per_forward`)."""
        return self.tokens_per_forward

    def metrics(self) -> dict[str, float | int | list[int]]:
        """The rollout metrics as plain Python values (docs/trainer.md, 'Run folders')."""
        return {
            "tokens_per_forward": self.tokens_per_forward,
            "nfe_per_token": self.nfe_per_token,
            "mean_ewc": self.mean_ewc,
            "commits_histogram": self.commits_histogram.tolist(),
            "nfe_total": int(self.nfe.sum()),
            "generated_tokens": self.num_generated,
            "response_tokens": int(sum(len(s) for s in self.sequences)),
            "model_calls": self.model_calls,
            "finished_fraction": float(self.finished.float().mean()) if len(self.finished) else float("nan"),
        }


# ---------------------------------------------------------------------------------------------- helpers
def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, Lq, Lk] -> additive float mask [B, 1, Lq, Lk] (0 allowed, dtype-min hidden)."""
    out = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return out.masked_fill_(allowed, 0.0)[:, None]


def _prompt_positions(prompt_pad: torch.Tensor) -> torch.Tensor:
    """int64 [B, L0]: RoPE positions of left-padded prompts (cumsum of real tokens − 1; pads get 1,
    as :meth:`slim_ops.BlockLayout.position_ids`; pad keys are never attended to)."""
    valid = ~prompt_pad
    return (valid.long().cumsum(-1) - 1).masked_fill(prompt_pad, 1)


def _bidirectional_allowed(prompt_pad: torch.Tensor, response_len: int) -> torch.Tensor:
    """bool [B, L, L]: every key except prompt pads; a pad query attends to itself only."""
    B, L0 = prompt_pad.shape
    L = L0 + response_len
    keypad = torch.cat([prompt_pad, prompt_pad.new_zeros(B, response_len)], dim=1)
    allowed = (~keypad)[:, None, :].expand(B, L, L)
    eye = torch.eye(L, dtype=torch.bool, device=prompt_pad.device)[None]
    return torch.where(keypad[:, :, None], eye, allowed)


class _Attention:
    """How a forward call gets its attention pattern: a :class:`slim_ops.BlockLayout` handed to the model
    (when it runs slim_ops' block-diffusion attention, no mask tensor at all) or the layout's dense
    predicate as a 4D additive mask (plain SDPA / eager attention)."""

    def __init__(self, model, mode: str, dtype: torch.dtype):
        impl = getattr(model.config, "_attn_implementation", None)
        try:
            from slim_ops.integrations.hf import ATTN_NAME
        except ImportError:  # pragma: no cover - the integration ships with slim_ops
            ATTN_NAME = None
        if mode not in ("auto", "layout", "dense"):
            raise ValueError(f"attention must be 'auto', 'layout' or 'dense', got {mode!r}")
        if mode == "layout" and (ATTN_NAME is None or impl != ATTN_NAME):
            raise ValueError("attention='layout' needs a model running slim_ops attention: call "
                             "model.set_attn_implementation(slim_ops.integrations.hf.register()) first "
                             f"(its attention implementation is {impl!r})")
        self.use_layout = mode == "layout" or (mode == "auto" and ATTN_NAME is not None and impl == ATTN_NAME)
        self.dtype = dtype

    def __call__(self, layout) -> dict:
        if self.use_layout:
            return {"block_layout": layout}
        return {"attention_mask": _additive(layout.dense_mask(), self.dtype)}

    def decode(self, cache_len: int, K: int, keypad: torch.Tensor) -> dict:
        """The decode layout's pattern (K slots over the cache: every key but cache pads). Dense: built from the
        pads directly, [R, 1, K, Lc + K] (once per block; the layout's general predicate costs ~20 ops)."""
        from slim_ops.layout import BlockLayout

        if self.use_layout:
            return {"block_layout": BlockLayout.decode(cache_len, K, cache_pad=keypad)}
        R = keypad.shape[0]
        hidden = torch.cat([keypad, keypad.new_zeros(R, K)], dim=1)[:, None, None, :]
        mask = torch.zeros(R, 1, K, cache_len + K, dtype=self.dtype, device=keypad.device)
        return {"attention_mask": mask.masked_fill_(hidden, torch.finfo(self.dtype).min)}

    def stair(self, L0: int, Lr: int, K: int, prompt_pad: torch.Tensor) -> dict:
        """The staircase over [left-padded prompt ‖ Lr response tokens] (``BlockLayout.packed(L0, Lr, K, 0,
        prompt_pad)``): dense, built from the block ids directly, [R, 1, L, L] (the layout's general predicate
        costs ~30 ops). Prompt blocks end at the prompt end; a query whose keys are all pads sees itself."""
        from slim_ops.layout import BlockLayout

        if self.use_layout:
            return {"block_layout": BlockLayout.packed(L0, Lr, K, 0, prompt_pad=prompt_pad)}
        R, L = prompt_pad.shape[0], L0 + Lr
        q = torch.arange(L, device=prompt_pad.device)
        blk = -1 - torch.div(L0 - 1 - q, K, rounding_mode="floor")  # block id, one formula for both sides
        keypad = torch.cat([prompt_pad, prompt_pad.new_zeros(R, Lr)], dim=1)
        allowed = (blk[None, :] <= blk[:, None])[None] & ~keypad[:, None, :]
        allowed |= ~allowed.any(-1, keepdim=True) & torch.eye(L, dtype=torch.bool, device=q.device)
        return {"attention_mask": _additive(allowed, self.dtype)}

    def decode_full(self, L0: int, L1: int, K: int, prompt_pad: torch.Tensor) -> torch.Tensor | None:
        """Dense: the decode masks of every block of a chunk at once, [R, 1, K, L0 + L1] (block b's is the view
        ``[..., :L0 + (b+1)·K]``: the response is never padded). None when forwards take a BlockLayout."""
        if self.use_layout:
            return None
        full = torch.zeros(prompt_pad.shape[0], 1, K, L0 + L1, dtype=self.dtype, device=prompt_pad.device)
        full[..., :L0].masked_fill_(prompt_pad[:, None, None, :], torch.finfo(self.dtype).min)
        return full

    def dense(self, allowed: torch.Tensor) -> dict:
        """A pattern that no BlockLayout describes (LLaDA / Dream whole-canvas attention)."""
        return {"attention_mask": _additive(allowed, self.dtype)}


def _accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep``: looked up once per model class (inspect.signature
    costs more than a small model's decode step); a forward replaced on the instance is inspected itself."""
    if "forward" in vars(model):
        return _forward_has_ltk(model.forward)
    return _forward_has_ltk_cached(type(model).forward)


def _forward_has_ltk(fwd) -> bool:
    import inspect

    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return "logits_to_keep" in params


_forward_has_ltk_cached = functools.lru_cache(maxsize=64)(_forward_has_ltk)


def _logits(model, ltk: bool, keep: int | torch.Tensor, **kwargs) -> torch.Tensor:
    """Model logits for the kept positions only (`keep`: last-n int, [n] or per-row [B, n] positions)."""
    if ltk:
        return model(logits_to_keep=keep, **kwargs).logits
    logits = model(**kwargs).logits  # models without logits_to_keep: slice afterwards
    if isinstance(keep, int):
        return logits[:, -keep:]
    return torch.take_along_dim(logits, keep[..., None], dim=1) if keep.dim() == 2 else logits[:, keep]


class _LaggedFlag:
    """"Is any slot of the current block still masked?" read without draining the device queue.

    CPU: the value of the last step (no asynchrony to preserve). CUDA: the flag is copied to pinned
    host memory behind an event; :meth:`done` answers from the step before the last one, waiting only
    for that older event while the newest step keeps the device busy."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.queue: list[tuple[torch.Tensor, object]] = []

    def push(self, still_masked: torch.Tensor) -> None:
        if not self.cuda:
            self.queue = [(still_masked, None)]
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(still_masked, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.queue.append((host, ev))

    def done(self) -> bool:
        if not self.queue:
            return False
        if not self.cuda:
            return not bool(self.queue[-1][0])
        if len(self.queue) < 2:
            return False
        host, ev = self.queue.pop(0)
        ev.synchronize()
        return not bool(host)


def _as_prompt_list(prompts, vocab: int, mask_id: int) -> list[torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = [prompts]
        elif prompts.dim() == 2:
            prompts = list(prompts)
        else:
            raise ValueError(f"prompts tensor must be [L] or [B, L] (no padding), "
                             f"got shape {tuple(prompts.shape)}")
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id sequences (list[int] or 1D tensors)")
    out = []
    for i, p in enumerate(prompts):
        t = torch.as_tensor(p).detach().cpu()
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1D sequence of token ids, "
                             f"got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"prompt {i} must hold integer token ids, got dtype {t.dtype}")
        t = t.to(torch.int64)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): min {lo}, max {hi}")
        if bool((t == mask_id).any()):
            raise ValueError(f"prompt {i} contains the mask token {mask_id}; prompts must be clean text")
        out.append(t)
    return out


def _check_ids(name: str, ids, vocab: int) -> list[int]:
    if ids is None:
        return []
    try:
        out = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of int token ids, got {ids!r}") from None
    if any(isinstance(i, bool) for i in (ids if not isinstance(ids, torch.Tensor) else [])) or \
            any(not 0 <= i < vocab for i in out):
        raise ValueError(f"{name} must hold token ids in [0, {vocab}), got {ids!r}")
    return out


def _check_options(gamma, factor, cfg_scale, cache, info) -> None:
    for name, v, lo_open in (("gamma", gamma, False), ("factor", factor, True)):
        if isinstance(v, bool) or not isinstance(v, float | int) or not math.isfinite(float(v)) or (
                float(v) <= 0 if lo_open else float(v) < 0):
            raise ValueError(f"{name} must be a finite float {'> 0' if lo_open else '>= 0'}, got {v!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, float | int) or not math.isfinite(
            float(cfg_scale)) or float(cfg_scale) < 0:
        raise ValueError(f"cfg_scale must be a finite float >= 0 (0 = off), got {cfg_scale!r}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if info["block_causal"] and cache != "none":
        raise ValueError(f"cache={cache!r} is for LLaDA / Dream; SDAR decodes against its exact KV cache "
                         "(use_cache=True)")
    if info["block_causal"] and float(cfg_scale) > 0:
        raise ValueError("cfg_scale is supported for LLaDA / Dream (bidirectional canvas), not for SDAR")


def _check_args(block_size, max_new_tokens, steps_per_block, strategy, tau, m, temperature, top_k, top_p,
                batch_size) -> int:
    for name, v in (("block_size", block_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if block_size > 64:
        raise ValueError(f"block_size must be <= 64 (the decode step sorts a block in registers), "
                         f"got {block_size}")
    S = block_size if steps_per_block is None else steps_per_block
    if isinstance(S, bool) or not isinstance(S, int) or S < 1:
        raise ValueError(f"steps_per_block must be a positive int or None (= block_size), "
                         f"got {steps_per_block!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not (isinstance(tau, float | int) and 0.0 < float(tau) < 1.0):
        raise ValueError(f"tau must be a float in (0, 1), got {tau!r}")
    if not (isinstance(m, float | int) and float(m) >= 0.0 and math.isfinite(float(m))):
        raise ValueError(f"m must be a finite float >= 0 (0 means m_eff = floor), got {m!r}")
    if not (isinstance(temperature, float | int) and float(temperature) >= 0.0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, float | int) and 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None (all prompts at once), "
                         f"got {batch_size!r}")
    return S


# ---------------------------------------------------------------------------------------------- engine
class _Recorder:
    """Output buffers for the rows of a generate call (indexed by original row id) and a log of the steps.

    A step appends references to its outputs (no tensor op); :meth:`finish` turns the log into the per-row,
    per-row-step records in a few vectorised ops: a row's step index is the number of earlier steps in which
    it was active, and a slot is committed in exactly one step."""

    def __init__(self, B: int, L1: int, max_steps: int, pad_id: int, device: torch.device):
        self.B, self.L1, self.max_steps, self.device = B, L1, max_steps, device
        self.tokens = torch.full((B, L1), pad_id, dtype=torch.int64, device=device)
        self.log: list[tuple] = []

    def step(self, rows: torch.Tensor, blocks: torch.Tensor, active: torch.Tensor, out) -> None:
        """rows [R]: original row ids; blocks [R]: the block index each row worked on; active [R]: whether the
        row's block had masked slots (a step of an inactive row is not one of its steps)."""
        self.log.append((rows, blocks, active, out.commit, out.confidence, out.num_committed, out.risk))

    def finish(self, K: int) -> dict[str, torch.Tensor]:
        B, dev = self.B, self.device
        step_map = torch.full((B, self.L1), -1, dtype=torch.int32, device=dev)
        conf = torch.full((B, self.L1), float("nan"), dtype=torch.float32, device=dev)
        commits = torch.zeros(B, self.max_steps, dtype=torch.int32, device=dev)
        ewc = torch.zeros(B, self.max_steps, dtype=torch.float32, device=dev)
        if not self.log:
            return dict(step_map=step_map, conf=conf, commits=commits, ewc=ewc,
                        nfe=torch.zeros(B, dtype=torch.int64, device=dev))
        rows, blocks, active, commit, c, num, risk = (torch.cat(x) for x in zip(*self.log))
        T = len(self.log)
        t = torch.repeat_interleave(torch.arange(T, device=dev),
                                    torch.tensor([e[0].shape[0] for e in self.log], device=dev))
        A = torch.zeros(T, B, dtype=torch.int64, device=dev)
        A[t, rows] = active.to(torch.int64)  # a row is in a step at most once
        local = (A.cumsum(0) - A)[t, rows]  # each entry's row-step index
        a = active.nonzero()[:, 0]
        commits[rows[a], local[a]] = num[a].to(torch.int32)
        ewc[rows[a], local[a]] = risk[a].to(torch.float32)
        cols = blocks[:, None] * K + torch.arange(K, device=dev)[None, :]
        rr = rows[:, None].expand_as(cols)
        step_map[rr[commit], cols[commit]] = local[:, None].expand_as(cols)[commit].to(torch.int32)
        conf[rr[commit], cols[commit]] = c[commit].to(torch.float32)
        return dict(step_map=step_map, conf=conf, commits=commits, ewc=ewc, nfe=A.sum(0))


def _stepper(vocab: int, info, device: torch.device, kw: dict):
    """The decode step with the call's options checked once (slim_ops' prepared tau_budget_step)."""
    from slim_ops.ops.tau_budget.op import prepare_step

    return prepare_step(vocab, info["mask_id"], device, **kw)


def _step(logits, block, info, floor, stepper):
    # the mask token is never a prediction (a committed μ would leave its slot masked for good); suppressed
    # ids (LLaDA's logits_eos_inf) go the same way. The logits are the engine's own tensor.
    ban = info.get("ban")
    if ban is None:
        logits[..., info["mask_id"]] = float("-inf")
    else:
        logits.index_fill_(-1, ban, float("-inf"))
    return stepper(logits, block, floor)


def _guided(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """LLaDA's classifier-free guidance: rows [0, R) conditional c, rows [R, 2R) unconditional u ->
    u + (s + 1)(c − u)."""
    c, u = logits.chunk(2, dim=0)
    return u + (cfg_scale + 1.0) * (c - u)


def _with_uncond(ids: torch.Tensor, prompt_real: torch.Tensor, mask_id: int) -> torch.Tensor:
    """[R, L] canvas -> [2R, L]: the canvas, then the same canvas with the prompt's tokens replaced by μ."""
    return torch.cat([ids, ids.masked_fill(prompt_real, mask_id)], dim=0)


def _run_block(forward, block, info, S, K, stepper, rec, rows, bidx, counters, early_exit):
    """Denoise one block for the active rows: up to S steps, each one forward + one decode step.

    ``forward(block, j) -> (logits [R, K, V], token positions processed)``; ``bidx`` [R]: the block's index."""
    import slim_ops

    mask_id = info["mask_id"]
    flag = _LaggedFlag(block.device)
    active = torch.ones(block.shape[0], dtype=torch.bool, device=block.device)  # the block starts all masked
    for j in range(S):
        if early_exit and flag.done():
            break
        logits, n_tok = forward(block, j)
        counters["model_calls"] += 1
        counters["forward_tokens"] += n_tok
        out = _step(logits, block, info, slim_ops.static_floor(K, S, j), stepper)
        rec.step(rows, bidx, active, out)
        block = out.block
        active = (block == mask_id).any(dim=1)
        flag.push(active.any())
    return block


@torch.no_grad()
def _generate_chunk(model, prompts: list[torch.Tensor], info, *, K, S, nb, use_cache, stepper, early_exit,
                    rec: _Recorder, row_ids: torch.Tensor, counters, attention: str, cache: str = "none",
                    cfg_scale: float = 0.0) -> None:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    attn_of = _Attention(model, attention, dtype)
    ltk = _accepts_logits_to_keep(model)
    mask_id, eos_id, pad_id, shift = info["mask_id"], info["eos_id"], info["pad_id"], info["shift"]
    B = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    L0 = int(plen.max())
    L1 = nb * K
    prompt = torch.full((B, L0), pad_id, dtype=torch.int64)
    for i, p in enumerate(prompts):
        prompt[i, L0 - len(p):] = p
    prompt = prompt.to(device)
    prompt_pad = (torch.arange(L0)[None, :] < (L0 - plen)[:, None]).to(device)
    ppos = _prompt_positions(prompt_pad)
    plen = plen.to(device)
    rows = row_ids.to(device)  # original row ids of the active rows
    sel = torch.arange(B, device=device)  # active rows as indices into this chunk's prompt tensors
    arK = torch.arange(K, device=device)

    if info["block_causal"]:
        cache = None
        if use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        dec_full = attn_of.decode_full(L0, L1, K, prompt_pad) if cache is not None else None
        for b in range(nb):
            R = sel.numel()
            cols = b * K + arK
            pos = (plen[sel] + b * K)[:, None] + arK[None, :]
            if cache is None or b == 0:
                # staircase over [prompt ‖ blocks 0..b] (with the cache: the prefill, fused with the first
                # denoising step of block 0; its K/V of the prompt are kept, those of the block cropped)
                Lr = (b + 1) * K
                stair = attn_of.stair(L0, Lr, K, prompt_pad[sel])
                rpos = plen[sel][:, None] + torch.arange(Lr, device=device)[None, :]
                spos = torch.cat([ppos[sel], rpos], dim=1)
                prefix = torch.cat([prompt[sel], rec.tokens[rows][:, : b * K]], dim=1)
            if cache is not None:
                Lc = L0 + b * K
                if dec_full is not None:
                    dec = {"attention_mask": dec_full[..., : Lc + K]}
                else:
                    dec = attn_of.decode(Lc, K, torch.cat([prompt_pad[sel], prompt_pad.new_zeros(R, b * K)], dim=1))

            def forward(blk, j, b=b, R=R, pos=pos, dec=dec if cache is not None else None,
                        stair=stair, spos=spos, prefix=prefix):
                if cache is None or (b == 0 and j == 0):
                    ids = torch.cat([prefix, blk], dim=1)
                    logits = _logits(model, ltk, K, input_ids=ids, position_ids=spos, cache=cache,
                                     use_cache=cache is not None, **stair)
                    n_tok = R * ids.shape[1]
                else:
                    logits = _logits(model, ltk, K, input_ids=blk, position_ids=pos, cache=cache,
                                     use_cache=True, **dec)
                    n_tok = R * K
                if cache is not None:
                    cache.crop(-K)  # drop the K/V of the partially masked block
                return logits, n_tok

            block = torch.full((R, K), mask_id, dtype=torch.int64, device=device)
            bidx = torch.full((R,), b, dtype=torch.int64, device=device)
            block = _run_block(forward, block, info, S, K, stepper, rec, rows, bidx, counters, early_exit)
            rec.tokens[rows[:, None], cols[None, :]] = block
            if b + 1 == nb:
                break
            if cache is not None:  # "save" pass: append the complete block's K/V to the cache
                _logits(model, ltk, 1, input_ids=block, position_ids=pos, cache=cache, use_cache=True, **dec)
                counters["model_calls"] += 1
                counters["forward_tokens"] += R * K
            keep = _retire(block, eos_id)
            if keep is not None:
                if keep.numel() == 0:
                    return
                if cache is not None:
                    cache.batch_select_indices(keep)
                    dec_full = dec_full[keep] if dec_full is not None else None
                rows, sel = rows[keep], sel[keep]
        return

    if cache != "none":
        _decode_cached(model, ltk, info, prompt, prompt_pad, ppos, plen, K=K, S=S, nb=nb, mode=cache,
                       stepper=stepper, early_exit=early_exit, rec=rec, rows=rows, counters=counters,
                       cfg_scale=cfg_scale)
        return
    # LLaDA / Dream: bidirectional over the whole canvas, no cache. Rows advance through their blocks
    # independently (a row whose block is complete moves on at the next step; nothing is shared between
    # rows but the forward call), so a step costs one canvas forward whatever each row's progress.
    canvas = torch.cat([prompt, torch.full((B, L1), mask_id, dtype=torch.int64, device=device)], dim=1)
    prompt_real = torch.cat([~prompt_pad, prompt_pad.new_zeros(B, L1)], dim=1)
    allowed = _bidirectional_allowed(prompt_pad, L1)
    attn = attn_of.dense(allowed if cfg_scale == 0 else torch.cat([allowed, allowed]))
    pos = torch.cat([ppos, plen[:, None] + torch.arange(L1, device=device)[None, :]], dim=1)
    # per row: the block it reads (a row that is done re-reads its last block, so nothing is committed for
    # it), whether it is still decoding, its step inside the block (for the floor, when S does not divide K)
    cur = torch.zeros(B, dtype=torch.int64, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    mod = K % S
    jstep = torch.zeros(B, dtype=torch.int64, device=device) if mod else None
    base = (L0 + arK)[None, :]
    flag = _LaggedFlag(device)

    def save(idx):  # the response of rows idx (visited blocks; never-visited ones stay pad)
        visited = torch.arange(L1, device=device)[None, :] < (cur[idx] + 1)[:, None] * K
        rec.tokens[rows[idx]] = torch.where(visited, canvas[idx, L0:], rec.tokens[rows[idx]])

    for t in range(nb * S):
        if t and t % S == 0:  # once per S steps (the block period): finished rows leave the batch
            if not bool(active.all()):
                keep = active.nonzero()[:, 0]
                save((~active).nonzero()[:, 0])
                if keep.numel() == 0:
                    return
                rows, canvas, pos, prompt_real, cur, active = (rows[keep], canvas[keep], pos[keep],
                                                               prompt_real[keep], cur[keep], active[keep])
                keep2 = keep if cfg_scale == 0 else torch.cat([keep, keep + attn["attention_mask"].shape[0] // 2])
                attn = {name: m[keep2] for name, m in attn.items()}
                jstep = jstep[keep] if mod else None
        elif early_exit and flag.done():
            break
        slots = cur[:, None] * K + base  # [R, K] canvas positions of each row's block
        block = canvas.gather(1, slots)
        rows_keep = slots - shift if shift else slots
        if cfg_scale > 0:
            logits = _guided(_logits(model, ltk, torch.cat([rows_keep, rows_keep]),
                                     input_ids=_with_uncond(canvas, prompt_real, mask_id),
                                     position_ids=torch.cat([pos, pos]), use_cache=False, **attn), cfg_scale)
        else:
            logits = _logits(model, ltk, rows_keep, input_ids=canvas, position_ids=pos, use_cache=False, **attn)
        counters["model_calls"] += 1
        counters["forward_tokens"] += canvas.numel() * (2 if cfg_scale > 0 else 1)
        # static floor f_j per row (docs/decode.md, 'The τ-budget rule'): one int when S divides K
        floor = K // S if not mod else K // S + (jstep < mod).to(torch.int64)
        out = _step(logits, block, info, floor, stepper)
        canvas.scatter_(1, slots, out.block)
        rec.step(rows, cur, active, out)
        complete = active & ~(out.block == mask_id).any(dim=1)
        ends = complete & ((out.block == eos_id).any(dim=1) | (cur == nb - 1))  # EOS, or the last block
        cur = torch.where(ends, cur, cur + complete.to(torch.int64))
        active = active & ~ends
        if mod:
            jstep = torch.where(complete, 0, jstep + 1)
        flag.push(active.any())
    save(torch.arange(rows.numel(), device=device))


def _drop_window(cache, w0: int, e: int) -> None:
    """Keep the K/V of positions [0, w0) ∪ [e, L) in every layer (the dual cache); keys are order-free for a
    fully visible bidirectional pattern, so the window's fresh K/V are simply appended after them."""
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys[:, :, :w0], layer.keys[:, :, e:]], dim=2)
        layer.values = torch.cat([layer.values[:, :, :w0], layer.values[:, :, e:]], dim=2)


@torch.no_grad()
def _decode_cached(model, ltk, info, prompt, prompt_pad, ppos, plen, *, K, S, nb, mode, stepper, early_exit, rec,
                   rows, counters, cfg_scale) -> None:
    """LLaDA / Dream with Fast-dLLM's prefix or dual cache (module docstring): blocks in lockstep, a full
    refresh forward at each block start, window-only forwards against the cached K/V after it."""
    from transformers import DynamicCache

    device = prompt.device
    dtype = next(model.parameters()).dtype
    mask_id, eos_id, shift = info["mask_id"], info["eos_id"], info["shift"]
    B, L0 = prompt.shape
    L1 = nb * K
    L = L0 + L1
    guided = cfg_scale > 0
    canvas = torch.cat([prompt, torch.full((B, L1), mask_id, dtype=torch.int64, device=device)], dim=1)
    pos = torch.cat([ppos, plen[:, None] + torch.arange(L1, device=device)[None, :]], dim=1)
    keypad = torch.cat([prompt_pad, prompt_pad.new_zeros(B, L1)], dim=1)
    prompt_real = torch.cat([~prompt_pad, prompt_pad.new_zeros(B, L1)], dim=1)
    arK = torch.arange(K, device=device)

    def two(x):  # rows of the unconditional copy follow the conditional ones
        return torch.cat([x, x]) if guided else x

    for b in range(nb):
        s = L0 + b * K
        e = s + K
        w0 = s - shift  # first query position: row w0 + j scores slot s + j
        w1 = L if mode == "prefix" else e  # the window is [w0, w1)
        cols = b * K + arK
        state: dict = {}

        def forward(blk, j, s=s, e=e, w0=w0, w1=w1, state=state, canvas=canvas, pos=pos, keypad=keypad,
                    prompt_real=prompt_real):
            canvas[:, s:e] = blk
            ids = _with_uncond(canvas, prompt_real, mask_id) if guided else canvas
            if j == 0:  # refresh: the cache="none" forward of the whole canvas, its K/V kept
                cache = DynamicCache(config=model.config)
                allowed = two(_bidirectional_allowed(keypad[:, :L0], L1))
                logits = _logits(model, ltk, torch.arange(s, e, device=device) - shift, input_ids=ids,
                                 position_ids=two(pos), attention_mask=_additive(allowed, dtype), cache=cache,
                                 use_cache=True)
                if mode == "prefix":
                    cache.crop(-(L - w0))
                else:
                    _drop_window(cache, w0, w1)
                cpad = keypad[:, :w0] if mode == "prefix" else torch.cat([keypad[:, :w0], keypad[:, w1:]], 1)
                state.update(cache=cache, cpad=two(cpad))
                return (_guided(logits, cfg_scale) if guided else logits), ids.numel()
            cache, cpad = state["cache"], state["cpad"]
            Lq = w1 - w0
            keys_pad = torch.cat([cpad, cpad.new_zeros(cpad.shape[0], Lq)], dim=1)
            allowed = (~keys_pad)[:, None, :].expand(-1, Lq, -1)
            logits = _logits(model, ltk, arK, input_ids=ids[:, w0:w1], position_ids=two(pos[:, w0:w1]),
                             attention_mask=_additive(allowed, dtype), cache=cache, use_cache=True)
            cache.crop(-Lq)
            return (_guided(logits, cfg_scale) if guided else logits), ids.shape[0] * Lq

        block = canvas[:, s:e].clone()
        block = _run_block(forward, block, info, S, K, stepper, rec, rows,
                           torch.full((rows.numel(),), b, dtype=torch.int64, device=device), counters, early_exit)
        canvas[:, s:e] = block
        rec.tokens[rows[:, None], cols[None, :]] = block
        state.clear()
        if b + 1 == nb:
            break
        keep = _retire(block, eos_id)
        if keep is not None:
            if keep.numel() == 0:
                return
            rows, canvas, pos, keypad, prompt_real = rows[keep], canvas[keep], pos[keep], keypad[keep], \
                prompt_real[keep]


def _retire(block: torch.Tensor, eos_id: int) -> torch.Tensor | None:
    """Once per block (the one host sync): rows whose block holds EOS leave the batch.

    Returns the indices of the rows to keep, or None when every row continues."""
    has_eos = (block == eos_id).any(dim=1)
    if not bool(has_eos.any()):
        return None
    return (~has_eos).nonzero()[:, 0]


def generate(model: torch.nn.Module, prompts, *, block_size: int = 16, max_new_tokens: int = 256,
             steps_per_block: int | None = None, strategy: str = "tau_budget", tau: float = 0.9,
             m: float = 1.0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             use_cache: bool = True, generator: torch.Generator | None = None, batch_size: int | None = None,
             early_exit: bool = True, attention: str = "auto", backend: str | None = None, gamma: float = 0.1,
             factor: float = 1.0, suppress_ids=None, defer_ids=None, cfg_scale: float = 0.0,
             cache: str = "none") -> GenerateOutput:
    """Block-diffusion decoding of a batch of prompts (see the module docstring for the algorithm).

    Args:
        model: a model from :func:`slim_rl.models.tiny` / :func:`slim_rl.models.load` (attributes
            ``family``, ``mask_id``, ``eos_id``, ``pad_id``, ``shift``, ``block_causal``).
        prompts: list of B token-id sequences (list[int] or 1D int tensors) of any lengths ≥ 1, or an
            unpadded [B, L] int tensor. Must not contain ``mask_id``.
        block_size: K (1..64). max_new_tokens: response length cap (⌈max_new_tokens/K⌉ blocks decoded).
        steps_per_block: S (default K); step j of a block uses the floor f_j = ⌊K/S⌋ + [j < K mod S].
        strategy: "tau_budget", "threshold" or "topk" (docs/decode.md), or the peers' "entropy_bounded"
            (EB-sampler, parameter ``gamma``), "factor" (Fast-dLLM, parameter ``factor``) and "random" (LLaDA's
            random remasking; seeded by ``generator``); see :func:`slim_ops.tau_budget_step`. tau, m: the
            rule's τ, m. Every rule commits at least the static floor f_j, clamped to the masked slots.
        temperature, top_k, top_p, generator: sampling (temperature 0 = greedy, deterministic).
        use_cache: SDAR only: decode against the KV cache (True) or recompute the prefix every step.
        batch_size: decode at most this many prompts at once (None = all).
        early_exit: stop a block once every row's block is complete (False = always S steps).
        attention: "auto" hands SDAR forwards a :class:`slim_ops.BlockLayout` (``block_layout=`` kwarg, no
            mask tensor) when the model runs slim_ops attention
            (``model.set_attn_implementation(slim_ops.integrations.hf.register())``) and a dense 4D
            additive mask otherwise; "layout" insists on the former, "dense" forces the latter.
        backend: passed to :func:`slim_ops.tau_budget_step`.
        gamma, factor: parameters of the "entropy_bounded" (γ >= 0) and "factor" (> 0) rules.
        suppress_ids: token ids never predicted (logits −∞ before the step; LLaDA's ``logits_eos_inf``).
        defer_ids: token ids whose slots get confidence 0 (entropy +∞) for the selection: committed only
            when the floor needs them (LLaDA's ``confidence_eos_eot_inf``; the recorded confidence is 0).
        cfg_scale: classifier-free guidance scale s >= 0 (LLaDA / Dream; 0 = off): each forward also runs
            the canvas with the prompt's tokens replaced by μ (u), logits = u + (s + 1)(c − u).
        cache: LLaDA / Dream: "none" (exact, whole canvas every step), "prefix" or "dual" (Fast-dLLM's
            caches, approximate; the first step of each block is exact). SDAR uses ``use_cache``.

    Returns:
        :class:`GenerateOutput` (CPU tensors; rows in prompt order).
    """
    info = model_info(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    S = _check_args(block_size, max_new_tokens, steps_per_block, strategy, tau, m, temperature, top_k, top_p,
                    batch_size)
    _check_options(gamma, factor, cfg_scale, cache, info)
    suppress = _check_ids("suppress_ids", suppress_ids, vocab)
    defer = _check_ids("defer_ids", defer_ids, vocab)
    plist = _as_prompt_list(prompts, vocab, info["mask_id"])
    K = block_size
    nb = -(-max_new_tokens // K)
    device = next(model.parameters()).device
    B = len(plist)
    rec = _Recorder(B, nb * K, nb * S, info["pad_id"], device)
    kw = dict(tau=float(tau), m=float(m), temperature=float(temperature), top_k=top_k, top_p=float(top_p),
              generator=generator, strategy=strategy, backend=backend, gamma=float(gamma), factor=float(factor),
              defer_ids=torch.tensor(defer, dtype=torch.int64, device=device) if defer else None)
    stepper = _stepper(vocab, info, device, kw)
    if suppress:
        info = dict(info, ban=torch.tensor(sorted({info["mask_id"], *suppress}), dtype=torch.int64, device=device))
    counters = {"model_calls": 0, "forward_tokens": 0}
    chunk = B if batch_size is None else batch_size
    for s0 in range(0, B, chunk):
        ids = torch.arange(s0, min(B, s0 + chunk))
        _generate_chunk(model, plist[s0:s0 + chunk], info, K=K, S=S, nb=nb, use_cache=use_cache, stepper=stepper,
                        early_exit=early_exit, rec=rec, row_ids=ids, counters=counters, attention=attention,
                        cache=cache, cfg_scale=float(cfg_scale))

    recs = rec.finish(K)
    tokens = rec.tokens.cpu()
    step_map = recs["step_map"].cpu()
    conf = recs["conf"].cpu()
    # response length per row: through the first EOS, at most max_new_tokens; finished = EOS within it
    is_eos = tokens[:, :max_new_tokens] == info["eos_id"]
    finished = is_eos.any(dim=1)
    lengths = torch.where(finished, is_eos.int().argmax(dim=1) + 1, max_new_tokens).tolist()
    return GenerateOutput(
        sequences=[tokens[i, :n].clone() for i, n in enumerate(lengths)],
        step_map=[step_map[i, :n].clone() for i, n in enumerate(lengths)],
        confidence=[conf[i, :n].clone() for i, n in enumerate(lengths)],
        tokens=tokens, full_step_map=step_map, full_confidence=conf,
        commits=recs["commits"].cpu(), ewc=recs["ewc"].cpu(), nfe=recs["nfe"].cpu(), finished=finished,
        prompt_lengths=torch.tensor([len(p) for p in plist], dtype=torch.int64),
        block_size=K, steps_per_block=S,
        model_calls=counters["model_calls"], forward_tokens=counters["forward_tokens"],
    )


class _CallableModule(types.ModuleType):
    """Lets ``slim_rl.generate(model, prompts, ...)`` (the module) be called like the function."""

    def __call__(self, *args, **kwargs) -> GenerateOutput:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
