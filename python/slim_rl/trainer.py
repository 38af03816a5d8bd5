"""The SLIM-RL training loop (docs/objective.md and docs/trainer.md) for block-diffusion models.

One RL step:

1. **Rollout** — ``Q`` prompts × ``G`` samples decoded by :func:`slim_rl.generate` with the τ-budget
   rule (split across ranks, then gathered so every rank holds the whole batch in a canonical order).
2. **Reward and advantage** — the task's verifiable reward (0 for responses without EOS / truncated),
   ``dr_grpo`` or ``zscore`` advantages per prompt group, groups filtered by accuracy (docs/objective.md).
3. **Rows** — ``slim``: :func:`slim_ops.build_slim_rows` (n_q quadrature levels, per-block mask
   schedule, docs/objective.md, 'SLIM rows'); ``tracerl``: :func:`slim_ops.build_trace_rows` (trajectory slicing,
   docs/objective.md, 'TraceRL rows'); ``random``: :func:`slim_ops.build_random_rows` (TraceRL's random-masking /
   coupled baselines).
4. **logp_old** — log-probs of every row's loss positions under θ at the start of the step (no grad).
5. **Update** — E epochs over shuffled minibatches with gradient accumulation over micro-batches:
   the :class:`Scorer` (decoder → hidden states of the loss positions → :func:`slim_ops.masked_logprob`
   with the LM head's whole weight: no [n, V] tensor under any strategy), :func:`slim_ops.slim_policy_loss`
   (clipped ratio, k3 KL to θ_old or, with ``objective.kl_reference=ref``, to a frozen copy of the
   RL-start model), gradient clipping, AdamW whose state persists across steps, LR
   schedule. An update whose loss or global gradient norm is not finite is skipped (counted in the
   metrics); ``train.max_skipped_updates`` consecutive skips stop the run with :class:`TrainingError`.
6. **Checkpoint** (sharded, atomic, :mod:`slim_rl.checkpoint`) and 7. periodic greedy **evaluation**.

Training sequences are ``[prompt ‖ clean response ‖ noisy response]`` with the block-diffusion mask of
docs/attention.md, 'The training layout' (:meth:`slim_ops.BlockLayout.train`), response blocks aligned to the prompt
end, exactly the blocks the rollout decoded. Every random choice of step ``s`` (prompts, sampling, rows, shuffling)
comes from generators seeded by ``(seed, s)``, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
from typing import Any

import torch

import slim_ops
from slim_ops.layout import BlockLayout
from slim_rl import checkpoint as C
from slim_rl import distributed as D
from slim_rl import lora as LoRA
from slim_rl import precision as P
from slim_rl.advantages import compute_advantages
from slim_rl.config import Config, save_config, to_dict
from slim_rl.errors import ConfigError, PeerFailure, TrainingError
from slim_rl.tasks import Example, make_task, pad_left

__all__ = ["RolloutBatch", "Scorer", "Trainer", "TrainingError", "build_model", "noisy_stream_hidden", "seeded"]


_PER_UNIT = ("clip_frac", "ratio_mean", "clip_frac_delta")
_PER_TOKEN = ("entropy",)
_SLIM_ATTN = "slim_block_diffusion"  # slim_ops.integrations.hf.ATTN_NAME
_DTYPES = P.DTYPES


def seeded(*keys: int | str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``keys`` (e.g. ``(seed, step, "rows")``)."""
    h = 1469598103934665603
    for k in keys:
        for ch in str(k).encode() + b"|":
            h = ((h ^ ch) * 1099511628211) % (1 << 63)
    return torch.Generator().manual_seed(h)


def build_model(cfg: Config, device: str = "cpu") -> torch.nn.Module:
    """A tiny random model (``model.path`` empty) or a local checkpoint, on ``device``, its parameters in
    ``model.master_dtype`` (the compute dtype is applied by the trainer), with LoRA adapters when
    ``model.lora.r > 0``."""
    from slim_rl import models

    mc = cfg.model
    dtype = _DTYPES[mc.master_dtype]
    if mc.path:
        model = models.load(mc.path, mc.family, dtype=dtype)
    else:
        model = models.tiny(mc.family, vocab_size=mc.vocab_size, seed=mc.seed, hidden_size=mc.hidden_size,
                            num_layers=mc.num_layers, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
                            intermediate_size=mc.intermediate_size or None, dtype=dtype)
    if mc.attention == "slim":
        from slim_ops.integrations import hf

        model.set_attn_implementation(hf.register())
    if mc.lora.r > 0:
        LoRA.apply(model, mc.lora.r, mc.lora.alpha, mc.lora.dropout, mc.lora.target_modules, seed=mc.seed)
    return model.to(device)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder layer, non-reentrant (frozen LoRA bases and integer inputs need no
    grad); call it before ``fully_shard``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.2x names it so
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "model", None)
    if base is None:
        raise TypeError("expected a *ForCausalLM model with a .model decoder")
    return base


def noisy_stream_hidden(model: torch.nn.Module, prompt: torch.Tensor, prompt_pad: torch.Tensor,
                        clean: torch.Tensor, noisy: torch.Tensor, block_size: int) -> torch.Tensor:
    """Final hidden states scoring the noisy stream of ``[P ‖ C ‖ X]`` (docs/attention.md, 'The training layout').

    Args:
        prompt: [R, L0] left-padded prompt ids; prompt_pad: [R, L0] bool (True at pads).
        clean: [R, L1] clean response ids; noisy: [R, L1] the same with the noise set = mask id, or
            [R, n, L1]: n noisy streams sharing one clean stream (docs/attention.md, 'Shared clean stream',
            ``BlockLayout.packed``; the P∪C activations are computed once for the n rows — same values, fewer tokens).
        block_size: K (response blocks start at the prompt end).
    Returns:
        [R, L1, d] (or [R, n, L1, d]): row i scores noisy position i (the logit ``shift`` applied).

    Attention: a dense additive [R, 1, N, N] mask through the model's own attention (SDPA / eager), or,
    for a model switched to ``slim_ops.integrations.hf`` (``model.attention=slim``), the layout itself.
    """
    R, L0 = prompt.shape
    L1 = clean.shape[1]
    n = noisy.shape[1] if noisy.dim() == 3 else 0
    if n:
        layout = BlockLayout.packed(L0, L1, block_size, n, prompt_pad=prompt_pad)
        noisy = noisy.reshape(R, n * L1)
    else:
        layout = BlockLayout.train(L0, L1, block_size, prompt_pad=prompt_pad)
    pos = layout.position_ids(device=prompt.device).expand(R, -1)
    ids = torch.cat([prompt, clean, noisy], dim=1)
    if getattr(model.config, "_attn_implementation", None) == _SLIM_ATTN:
        # slim_ops block-diffusion attention: the layout travels with the call, no N×N mask
        out = _decoder(model)(input_ids=ids, position_ids=pos, block_layout=layout.to(prompt.device),
                              use_cache=False)
    else:
        allowed = layout.dense_mask(device=prompt.device)
        dtype = next(model.parameters()).dtype
        attn = torch.zeros(allowed.shape, dtype=dtype, device=prompt.device)
        attn.masked_fill_(~allowed, torch.finfo(dtype).min)
        attn = attn[:, None].expand(R, 1, -1, -1)
        out = _decoder(model)(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    h = out.last_hidden_state
    shift = int(getattr(model, "shift", 0))
    if n:
        return h[:, L0 + L1 - shift:L0 + L1 + n * L1 - shift].reshape(R, n, L1, -1)
    return h[:, L0 + L1 - shift:L0 + 2 * L1 - shift]


class Scorer(torch.nn.Module):
    """The training forward as one module — the unit DDP wraps and the FSDP2 root: ``[P ‖ C ‖ X]`` →
    hidden states of the loss positions → :func:`slim_ops.masked_logprob` with the LM head's weight.

    Under FSDP2 the head (with the embeddings and final norm) belongs to this root unit, so inside
    ``forward`` its weight is the whole all-gathered tensor and its gradient flows back to the shards;
    no ``[n, V]`` logits exist under any strategy.
    """

    def __init__(self, model: torch.nn.Module, block_size: int):
        super().__init__()
        self.model = model
        self.block_size = int(block_size)

    def forward(self, prompt: torch.Tensor, prompt_pad: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor,
                labels: torch.Tensor, loss_mask: torch.Tensor, return_entropy: bool = False):
        """prompt/prompt_pad/clean: [R, ·]; noisy: [R, L1] or [R, g, L1] (g rows sharing a clean stream);
        labels and loss_mask: [R·g, L1]. Returns the packed log-probs [n] (n = loss_mask.sum()), or
        (log-probs, entropies) with ``return_entropy``."""
        h = noisy_stream_hidden(self.model, prompt, prompt_pad, clean, noisy, self.block_size)
        if noisy.dim() == 3:
            h = h.reshape(-1, h.shape[2], h.shape[3])
        head = self.model.get_output_embeddings().weight
        dev = h.device.type
        if torch.is_autocast_enabled(dev):  # mixed precision: the head's product in the compute dtype too
            dt = torch.get_autocast_dtype(dev)
            h, head = h.to(dt), head.to(dt)
        return slim_ops.masked_logprob(h[loss_mask], head, labels[loss_mask], return_entropy=return_entropy)


@dataclasses.dataclass
class RolloutBatch:
    """A batch of responses (CPU tensors, one entry per response, canonical order by (group, sample)).

    prompts: prompt ids per response · group_ids [N] · response_ids [N, L1] (pad after the response)
    · response_len [N] (EOS included) · step_map [N, L1] (−1 past the response) · rewards [N]
    · stats: rollout metrics (EWC, commits, …) summed over ranks.
    """

    prompts: list[list[int]]
    group_ids: torch.Tensor
    response_ids: torch.Tensor
    response_len: torch.Tensor
    step_map: torch.Tensor
    rewards: torch.Tensor
    stats: dict[str, float] = dataclasses.field(default_factory=dict)

    @staticmethod
    def concat(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
        L1 = max(p.response_ids.shape[1] for p in parts)

        def widen(t: torch.Tensor, fill: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, L1 - t.shape[1]), value=fill)

        prompts = [pr for p in parts for pr in p.prompts]
        out = RolloutBatch(prompts, torch.cat([p.group_ids for p in parts]),
                           torch.cat([widen(p.response_ids, pad_id) for p in parts]),
                           torch.cat([p.response_len for p in parts]),
                           torch.cat([widen(p.step_map, -1) for p in parts]),
                           torch.cat([p.rewards for p in parts]))
        keys = {k for p in parts for k in p.stats}
        out.stats = {k: sum(p.stats.get(k, 0.0) for p in parts) for k in keys}
        order = sorted(range(len(prompts)), key=lambda i: (int(out.group_ids[i]), i))
        return out.select(torch.tensor(order, dtype=torch.int64))

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        il = idx.tolist()
        return RolloutBatch([self.prompts[i] for i in il], self.group_ids[idx], self.response_ids[idx],
                            self.response_len[idx], self.step_map[idx], self.rewards[idx], dict(self.stats))

    def __len__(self) -> int:
        return len(self.prompts)


def _lr_factor(cfg: Config, update: int, total: int) -> float:
    oc = cfg.optim
    warm = min(1.0, (update + 1) / oc.warmup_steps) if oc.warmup_steps > 0 else 1.0
    if oc.schedule == "cosine" and total > 0:
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(update, total) / total))
    return warm


class Trainer:
    """Runs SFT (optional), RL steps, evaluation, checkpoints and metrics for one :class:`Config`.

    ``overwrite``: the run folder may hold an earlier run, whose files are removed when this run first
    has something of its own to write (:meth:`claim_folder`), not before.
    """

    def __init__(self, cfg: Config, *, model: torch.nn.Module | None = None, task=None,
                 info: D.DistInfo | None = None, device: str | None = None, overwrite: bool = False):
        self.cfg = cfg.validate()
        self.info = info or D.init(cfg.dist.backend, device, cfg.dist.timeout_s)
        self.phase = "startup"  # what the run is doing (named when a peer fails)
        self.device = self.info.device if device is None else device
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.task = task if task is not None else make_task(cfg.task)
        self.model = model if model is not None else build_model(cfg, self.device)
        self.model.to(self.device)
        self._check_vocabulary()
        self.strategy = cfg.dist.strategy if self.info.active else "single"
        self.fsdp = self.strategy == "fsdp"
        self.ddp = self.strategy == "ddp"
        # mixed precision: parameters (master) in their own dtype, forwards in model.dtype (docs/trainer.md)
        self.compute_dtype = _DTYPES[cfg.model.dtype]
        self.master_dtype = next(self.model.parameters()).dtype
        self.lora = LoRA.has_adapters(self.model)
        if cfg.dist.cpu_offload and not self.fsdp:
            raise ConfigError("config: dist.cpu_offload=true needs FSDP2 under torchrun (dist.strategy=fsdp, "
                              "launched with torchrun --nproc_per_node=N, N >= 2)")
        if cfg.model.gradient_checkpointing:
            enable_checkpointing(self.model)  # before fully_shard
        self._decode_copy = P.DecodeCopy(self.model, self.compute_dtype)
        scorer = Scorer(self.model, cfg.rollout.block_size)
        if self.fsdp:
            D.broadcast_parameters(self.model, self.info)
            self.scorer = D.wrap_fsdp(scorer, self.model, mp_policy=P.fsdp_policy(self.compute_dtype,
                                                                                 self.master_dtype),
                                      cpu_offload=cfg.dist.cpu_offload)
            self._warm_up()  # FSDP2 sets up its root in the first forward: every rank together
            self.reshard()   # the root keeps its weights gathered after a forward; the optimizer needs shards
        elif self.ddp:
            self.scorer = D.wrap_ddp(scorer, self.info)  # broadcasts rank 0's weights
        else:
            self.scorer = scorer
        oc = cfg.optim
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.optimizer = P.adamw(trainable, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps,
                                 weight_decay=oc.weight_decay)
        self.step = 0            # RL steps done
        self.updates = 0         # optimizer steps done
        self.bad_streak = 0      # consecutive skipped (non-finite) updates
        self.counters = {"train_rows": 0, "rollouts": 0, "train_tokens": 0, "skipped_updates_total": 0}
        self.out_dir = cfg.train.out_dir
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        self.metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        self.overwrite = overwrite
        self._claimed = False
        self._resumed = False
        self._abandoned: int | None = None
        self._last_saved = -1
        self._tb = None
        self.history: list[dict[str, Any]] = []
        # objective.kl_reference=ref: a frozen copy of the model as RL starts (see init_reference)
        self.ref_scorer: Scorer | None = None
        if cfg.objective.kl_reference == "ref" and self.fsdp and not self.lora:
            raise ConfigError("config: objective.kl_reference=ref needs dist.strategy=ddp (under fsdp the frozen "
                              "reference would be a second unsharded model on every rank)")

    def _check_vocabulary(self) -> None:
        """The model's vocabulary must fit the task (else every response is unscorable: 0 training rows)."""
        V = int(self.model.get_output_embeddings().weight.shape[0])
        t = self.task
        if all(hasattr(t, k) for k in ("mask_id", "eos_id", "pad_id", "vocab_size")):
            want = {"vocabulary size": (t.vocab_size, V), "mask id": (t.mask_id, self.mask_id),
                    "eos id": (t.eos_id, self.eos_id), "pad id": (t.pad_id, self.pad_id)}
            for name, (need, have) in want.items():
                if int(need) != int(have):
                    raise ConfigError(f"config: the model does not fit task.name={getattr(t, 'name', '?')}: its "
                                      f"{name} is {have}, the task needs {need}")
        tok = getattr(t, "tok", None)
        if tok is not None and len(tok) > V:
            raise ConfigError(f"config: the tokenizer has {len(tok)} tokens but the model's vocabulary is {V}")

    def reshard(self) -> None:
        """FSDP2: put every unit back to its shards (the root keeps its weights gathered after a no-grad
        forward); the module's parameters are then the sharded ones the optimizer and checkpoints see."""
        if self.fsdp:
            for m in D.fsdp_units(self.scorer):
                m.reshard()

    def _warm_up(self) -> None:
        K = self.cfg.rollout.block_size
        z = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        clean = torch.zeros(1, K, dtype=torch.long, device=self.device)
        mask = torch.zeros(1, K, dtype=torch.bool, device=self.device)
        mask[0, 0] = True
        with torch.no_grad():
            self.scorer(z, z.bool(), clean, torch.full_like(clean, self.mask_id), clean, mask)

    # ------------------------------------------------------------------ helpers
    @property
    def mask_id(self) -> int:
        return int(self.model.mask_id)

    @property
    def pad_id(self) -> int:
        return int(self.model.pad_id)

    @property
    def eos_id(self) -> int:
        return int(self.model.eos_id)

    def claim_folder(self) -> None:
        """Called when this run first has something to write: with ``overwrite`` the earlier run's files
        go now (not before); a fresh run drops a stale metrics log; the config is written. Idempotent."""
        if self._claimed:
            return
        self._claimed = True
        if not self.info.is_main:
            return
        if self.overwrite:
            C.clear_run_files(self.out_dir)
        elif not self._resumed and self.step == 0 and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)
        os.makedirs(self.out_dir, exist_ok=True)
        save_config(self.cfg, os.path.join(self.out_dir, "config.yaml"))

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.claim_folder()
        if not self.info.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.cfg.train.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(self.out_dir, "tb"))
                except Exception:  # noqa: BLE001 - tensorboard is optional
                    self._tb = False
            if self._tb:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self._tb.add_scalar(k, v, record.get("step", 0))

    # ------------------------------------------------------------------ generation / evaluation
    def autocast(self):
        """The training forward's precision context: autocast to ``model.dtype`` over master weights (one
        process and DDP); FSDP2 casts through its MixedPrecisionPolicy instead."""
        return P.autocast(self.device, self.compute_dtype, self.master_dtype, enabled=not self.fsdp)

    def decode_model(self):
        """Context giving the model to decode with: a compute-dtype copy of the master weights, made once
        per rollout and dropped after (FSDP2: the gathered weights, already in the compute dtype)."""
        if self.fsdp:
            return contextlib.nullcontext(self.model)
        return self._decode_copy()

    @contextlib.contextmanager
    def gathered(self):
        """FSDP2: the whole weights on every rank for a stretch of decoding (ranks decode different
        prompts and take different numbers of forwards, so per-forward all-gathers could not be matched);
        every rank enters together. A no-op for the other strategies."""
        units = D.fsdp_units(self.scorer) if self.fsdp else []
        for m in units:
            m.set_reshard_after_forward(False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True)

    def _generate(self, prompts: list[list[int]], *, temperature: float, generator: torch.Generator | None):
        from slim_rl.generate import generate

        rc = self.cfg.rollout
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self.decode_model() as model:
            out = generate(model, prompts, block_size=rc.block_size, max_new_tokens=rc.max_new_tokens,
                           steps_per_block=rc.steps_per_block or None, strategy=rc.strategy, tau=rc.tau,
                           m=rc.m, temperature=temperature, top_k=rc.top_k, top_p=rc.top_p,
                           generator=generator, batch_size=rc.batch_size or None, gamma=rc.gamma,
                           factor=rc.factor, suppress_ids=[self.eos_id] if rc.suppress_eos else None,
                           defer_ids=[self.eos_id] if rc.defer_eos else None, cache=rc.cache)
        self.model.train(was_training)
        return out

    def evaluate(self, examples: list[Example] | None = None) -> dict[str, float]:
        """Greedy accuracy on the task's held-out prompts (split over ranks, gathered)."""
        exs = examples if examples is not None else self.task.eval_set()
        if self.cfg.eval.num_prompts:
            exs = exs[:self.cfg.eval.num_prompts]
        mine = list(range(self.info.rank, len(exs), self.info.world))
        rewards: list[float] = []
        with self.gathered():
            if mine:
                out = self._generate([exs[i].prompt for i in mine], temperature=0.0, generator=None)
                rewards = self._rewards(out, [exs[i] for i in mine])
        gathered = D.all_gather_objects(rewards, self.info)
        flat = [r for part in gathered for r in part]
        return {"accuracy": sum(flat) / max(len(flat), 1), "num_prompts": len(flat)}

    def _rewards(self, out, examples: list[Example]) -> list[float]:
        rc = self.cfg.rollout
        rewards = self.task.reward(out.sequences, examples)
        for i, seq in enumerate(out.sequences):
            truncated = not bool(out.finished[i])
            if rc.truncation_margin >= 0:
                truncated = truncated or len(seq) >= rc.max_new_tokens - rc.truncation_margin
            if truncated:
                rewards[i] = 0.0
        return rewards

    # ------------------------------------------------------------------ rollout
    def rollout(self, step: int) -> RolloutBatch:
        """Sample this step's prompts (same on every rank), decode this rank's share, gather."""
        rc = self.cfg.rollout
        rng = random.Random(int(seeded(self.cfg.train.seed, step, "prompts").initial_seed()))
        examples = self.task.sample(rc.prompts_per_step, rng)
        mine = [q for q in range(len(examples)) if q % self.info.world == self.info.rank]
        local: RolloutBatch
        with self.gathered():
            local = self._rollout_share(step, examples, mine)
        parts = D.all_gather_objects(local, self.info)
        return RolloutBatch.concat(parts, self.pad_id)

    def _rollout_share(self, step: int, examples: list[Example], mine: list[int]) -> RolloutBatch:
        rc = self.cfg.rollout
        if mine:
            flat = [(q, g) for q in mine for g in range(rc.group_size)]
            gen = seeded(self.cfg.train.seed, step, "rollout", self.info.rank)
            out = self._generate([examples[q].prompt for q, _ in flat], temperature=rc.temperature,
                                 generator=gen)
            rewards = self._rewards(out, [examples[q] for q, _ in flat])
            lens = torch.tensor([len(s) for s in out.sequences], dtype=torch.int64)
            L1 = out.tokens.shape[1]
            pos = torch.arange(L1)[None, :]
            valid = pos < lens[:, None]
            resp = torch.where(valid, out.tokens, torch.full_like(out.tokens, self.pad_id))
            smap = torch.where(valid, out.full_step_map.to(torch.int64), torch.full_like(resp, -1))
            m = out.metrics()
            valid_steps = torch.arange(out.commits.shape[1])[None, :] < out.nfe[:, None]
            stats = {"ewc_sum": float(out.ewc[valid_steps].double().sum()),
                     "row_steps": float(valid_steps.sum()),
                     "commits_sum": float(out.commits[valid_steps].double().sum()),
                     "nfe": float(m["nfe_total"]), "model_calls": float(m["model_calls"]),
                     "finished": float(out.finished.float().sum())}
            local = RolloutBatch([examples[q].prompt for q, _ in flat],
                                 torch.tensor([q for q, _ in flat], dtype=torch.int64), resp, lens, smap,
                                 torch.tensor(rewards, dtype=torch.float32), stats)
        else:
            local = RolloutBatch([], torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.int64),
                                 torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.int64),
                                 torch.zeros(0), {})
        return local

    # ------------------------------------------------------------------ rows
    def build_rows(self, batch: RolloutBatch, step: int) -> dict[str, torch.Tensor]:
        """Advantages + training rows for a global batch (identical on every rank)."""
        ac, oc, K = self.cfg.advantage, self.cfg.objective, self.cfg.rollout.block_size
        adv = compute_advantages(batch.rewards, batch.group_ids, kind=ac.kind, filter_groups=ac.filter_groups,
                                 low=ac.filter_low, high=ac.filter_high)
        kept = adv.keep.nonzero().squeeze(1)
        info = {"num_groups": adv.num_groups, "kept_groups": adv.num_kept_groups,
                "kept_responses": int(kept.numel())}
        if kept.numel() == 0:
            return {"rows": 0, **info}
        # trim the canvas to the longest kept response, rounded up to whole blocks
        L1 = int(batch.response_len[kept].max()) + oc.post_tokens  # post_tokens: pads trained after EOS
        L1 = max(K, -(-L1 // K) * K)
        resp = batch.response_ids[kept][:, :L1]
        if resp.shape[1] < L1:
            resp = torch.nn.functional.pad(resp, (0, L1 - resp.shape[1]), value=self.pad_id)
        lens = batch.response_len[kept]
        if oc.name == "slim":
            r = slim_ops.build_slim_rows(resp, lens, block_size=K, mask_id=self.mask_id, pad_id=self.pad_id,
                                         num_nodes=oc.num_nodes, spread=oc.spread, shape=oc.shape,
                                         decreasing=oc.decreasing, schedule_blocks=oc.schedule_blocks,
                                         post_tokens=oc.post_tokens, nodes=oc.nodes,
                                         generator=seeded(self.cfg.train.seed, step, "rows"))
        elif oc.name == "random":
            r = slim_ops.build_random_rows(resp, lens, block_size=K, mask_id=self.mask_id, pad_id=self.pad_id,
                                           lower=oc.random_low, upper=oc.random_high, num_rows=oc.random_rows,
                                           coupled=oc.coupled, post_tokens=oc.post_tokens,
                                           generator=seeded(self.cfg.train.seed, step, "rows"))
        else:
            smap = batch.step_map[kept][:, :L1]
            if smap.shape[1] < L1:
                smap = torch.nn.functional.pad(smap, (0, L1 - smap.shape[1]), value=-1)
            r = slim_ops.build_trace_rows(resp, smap, block_size=K, shrink=oc.shrink, mask_id=self.mask_id,
                                          pad_id=self.pad_id, response_len=lens, post_tokens=oc.post_tokens)
        ridx = r.response_index
        Q = oc.num_nodes
        shared = oc.name == "slim" and oc.shared_clean and ridx.numel() == Q * kept.numel()
        prompt, ppad = pad_left([batch.prompts[i] for i in kept.tolist()], self.pad_id)  # once per response
        return {"rows": int(ridx.numel()), "prompt": prompt[ridx], "prompt_pad": ppad[ridx], "clean": resp[ridx],
                "noisy": r.noisy_ids, "loss_mask": r.loss_mask, "weights": r.weights.float(),
                "advantages": adv.advantages[kept][ridx], "L1": L1, "group": Q if shared else 1, **info,
                "mean_abs_adv": float(adv.advantages[kept].abs().mean()),
                "mask_ratio": float(r.loss_mask.float().sum(1).div(L1).mean())}  # |M| / L1, see docs/trainer.md

    # ------------------------------------------------------------------ frozen reference (kl_reference=ref)
    def reference(self) -> Scorer:
        """The frozen reference scorer: a copy of the model taken when first asked (the RL start)."""
        if self.ref_scorer is None:
            ref = copy.deepcopy(self.model).eval()
            ref.requires_grad_(False)
            self.ref_scorer = Scorer(ref, self.cfg.rollout.block_size)
        return self.ref_scorer

    def _logp_ref(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probs under the frozen reference: with LoRA, the base model itself (adapters switched off,
        through the same wrapped scorer); else the copy taken at the RL start."""
        if self.lora:
            with LoRA.disabled(self.model):
                return self._logp_old(rows)
        return self._logp_old(rows, self.reference())

    def init_reference(self) -> None:
        """``objective.kl_reference=ref``: at the RL start the model is copied and saved to
        ``out_dir/reference`` (collective); a resumed run loads that copy instead."""
        if self.cfg.objective.kl_reference != "ref" or self.ref_scorer is not None or self.lora:
            return  # LoRA: the reference is the base model (adapters off), nothing to copy or save
        where = os.path.join(self.out_dir, "reference")
        if self.step == 0:
            self.claim_folder()
            C.save_checkpoint(where, 0, self.reference().model, None, info=self.info)
            return
        saved = sorted(d for d in os.listdir(where) if not d.endswith(".tmp")) if os.path.isdir(where) else []
        if not saved:
            raise C.CheckpointError(f"--resume: objective.kl_reference=ref but {where} holds no reference model")
        model = copy.deepcopy(self.model)
        C.load_weights(os.path.join(where, saved[-1]), model, info=self.info)  # verified: complete and intact
        self.ref_scorer = Scorer(model.eval().requires_grad_(False), self.cfg.rollout.block_size)

    # ------------------------------------------------------------------ log-probs and loss
    @staticmethod
    def _rows_of(units: torch.Tensor, g: int) -> torch.Tensor:
        """Row indices of shuffling units (a unit = one row, or the g rows sharing a clean stream)."""
        if g == 1:
            return units
        return (units[:, None] * g + torch.arange(g)[None, :]).reshape(-1)

    def _plan(self, units: torch.Tensor, per_micro: int) -> list[torch.Tensor | None]:
        """This rank's micro-batches (of units) of a minibatch ``units``: rank r takes units[r::W]; every
        rank gets the same number of micro-batches, ``None`` standing for a zero-weight filler."""
        W, r = self.info.world, self.info.rank
        mine = units[r::W]
        chunks: list[torch.Tensor | None] = [mine[s:s + per_micro] for s in range(0, mine.numel(), per_micro)]
        most = max(-(-units[q::W].numel() // per_micro) for q in range(W)) if units.numel() else 0
        return chunks + [None] * (max(most, 1 if self.info.active else 0) - len(chunks))

    def _score(self, rows: dict[str, Any], idx: torch.Tensor, return_entropy: bool = False, scorer=None):
        """Packed log-probs of rows ``idx`` (whole groups when the clean stream is shared) through the
        (wrapped) scorer, and their [rows, L1] loss mask."""
        dev = self.device
        g = rows["group"]

        def take(k, i=idx):
            return rows[k][i].to(dev)

        first = idx[::g] if g > 1 else idx
        noisy = take("noisy")
        if g > 1:
            noisy = noisy.view(first.numel(), g, -1)
        mask = take("loss_mask")
        with self.autocast():
            out = (scorer or self.scorer)(take("prompt", first), take("prompt_pad", first), take("clean", first),
                                          noisy, take("clean"), mask, return_entropy)
        return out, mask

    @torch.no_grad()
    def _logp_old(self, rows: dict[str, torch.Tensor], scorer: Scorer | None = None) -> torch.Tensor:
        """[rows, L1] fp32 log-probs under the current θ (or ``scorer``'s model: the frozen reference), 0 off
        the loss mask; rows split over ranks."""
        n, L1, g = rows["rows"], rows["L1"], rows["group"]
        out = torch.zeros(n, L1)
        units = torch.arange(n // g)
        mine: list[torch.Tensor] = []
        for chunk in self._plan(units, max(1, self.cfg.optim.micro_batch_rows // g)):
            idx = self._rows_of(units[:1] if chunk is None else chunk, g)
            lp, mask = self._score(rows, idx, scorer=scorer)
            if chunk is None:
                continue  # a filler forward (FSDP2 needs every rank in every all-gather)
            dense = torch.zeros(idx.numel(), L1, device=lp.device).masked_scatter(mask, lp.float())
            out[idx] = dense.cpu()
            mine.append(idx)
        self.reshard()
        if self.info.active:
            m_idx = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.int64)
            for r_idx, vals in D.all_gather_objects((m_idx, out[m_idx]), self.info):
                out[r_idx] = vals
        return out

    def _loss(self, rows, idx, logp_old, scale: float, logp_ref=None):
        oc = self.cfg.objective
        (lp, ent), mask = self._score(rows, idx, return_entropy=True)
        adv = rows["advantages"][idx].to(self.device)
        w = rows["weights"][idx].to(self.device)
        old = logp_old[idx].to(self.device)
        if oc.name == "slim":
            kw = dict(level=oc.level, clip_low=oc.clip_low, clip_high=oc.clip_high, clip_token=oc.clip_token)
        else:
            kw = dict(level="token", clip_token=oc.clip_token)
            w = torch.ones_like(w)
        kw.update(kl_coef=oc.kl_coef, kl_estimator=oc.kl_estimator, response_len=rows["L1"],
                  block_size=self.cfg.rollout.block_size, clip_delta=oc.clip_delta or None,
                  loss_agg=None if oc.loss_agg == "spec" else oc.loss_agg,
                  kl_reference=None if logp_ref is None else logp_ref[idx].to(self.device))
        dense = torch.zeros(mask.shape, dtype=torch.float32, device=lp.device).masked_scatter(mask, lp)
        loss, metrics = slim_ops.slim_policy_loss(dense, old, mask, adv, w, **kw)
        metrics["entropy"] = ent.detach().sum() / max(ent.numel(), 1)
        (loss * scale).backward()
        level = kw["level"]
        if level == "token":
            units = int(mask.sum())
        elif level == "sequence":
            units = int(mask.any(dim=1).sum())
        else:
            K = self.cfg.rollout.block_size
            nb = -(-mask.shape[1] // K)
            mp = torch.nn.functional.pad(mask, (0, nb * K - mask.shape[1]))
            units = int(mp.view(mask.shape[0], nb, K).any(dim=2).sum())
        return loss.detach(), metrics, int(mask.sum()), units

    @contextlib.contextmanager
    def _accumulating(self, sync: bool):
        """Gradient accumulation: DDP ``no_sync`` / FSDP2 without reduce-scatter unless ``sync``."""
        if self.ddp and not sync:
            with self.scorer.no_sync():
                yield
            return
        if self.fsdp:
            self.scorer.set_requires_gradient_sync(sync)
        yield

    def optimizer_step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *,
                       grad_clip: float, lr: float, loss_finite: bool) -> tuple[bool, float]:
        """Clip, check and step: skips the update (gradients dropped) when the loss on any rank or the
        global gradient norm is not finite. Returns (stepped, grad_norm)."""
        gn = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        if hasattr(gn, "full_tensor"):  # FSDP2: a DTensor
            gn = gn.full_tensor()
        gn_f = float(gn)
        bad = D.any_true(not loss_finite, self.info) or not math.isfinite(gn_f)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            return False, gn_f
        for pg in optimizer.param_groups:
            pg["lr"] = lr
        optimizer.step()
        return True, gn_f

    def update(self, batch: RolloutBatch, step: int) -> dict[str, Any]:
        """Steps 2-5 of an RL step on a global batch (the same on every rank); returns metrics."""
        oc = self.cfg.optim
        rows = self.build_rows(batch, step)
        rec: dict[str, Any] = {k: rows[k] for k in ("num_groups", "kept_groups", "kept_responses", "rows")}
        rec["skipped_updates"] = 0
        if rows["rows"] == 0:
            return rec
        n = rows["rows"]
        logp_old = self._logp_old(rows)
        logp_ref = self._logp_ref(rows) if self.cfg.objective.kl_reference == "ref" else None
        token_mean = self.cfg.objective.loss_agg == "token-mean"
        W = self.info.world
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norms: list[float] = []
        sums: dict[str, float] = {}
        wsum: dict[str, float] = {}
        total_updates = self.cfg.train.steps * oc.epochs * oc.minibatches
        self.model.train()
        grp = rows["group"]
        per_micro = max(1, oc.micro_batch_rows // grp)
        skipped = 0
        for epoch in range(oc.epochs):
            perm = torch.randperm(n // grp, generator=seeded(self.cfg.train.seed, step, "shuffle", epoch))
            for mb in torch.tensor_split(perm, oc.minibatches):
                if mb.numel() == 0:
                    continue
                B_mb = mb.numel() * grp
                self.optimizer.zero_grad(set_to_none=True)
                plan = self._plan(mb, per_micro)
                finite = True
                for j, chunk in enumerate(plan):
                    idx = self._rows_of(mb[:1] if chunk is None else chunk, grp)
                    # DDP / FSDP average over ranks: x W makes the sum over ranks the global-batch gradient
                    scale = 0.0 if chunk is None else idx.numel() / B_mb * W
                    if token_mean and chunk is not None:  # the loss is a mean over the minibatch's tokens
                        tok_mb = rows["loss_mask"][self._rows_of(mb, grp)].sum().clamp_min(1)
                        scale = float(rows["loss_mask"][idx].sum() / tok_mb) * W
                    with self._accumulating(sync=j == len(plan) - 1):
                        loss, metrics, ntok, units = self._loss(rows, idx, logp_old, scale, logp_ref)
                    if chunk is None:
                        continue
                    part = {"loss": float(loss), **{k: float(v) for k, v in metrics.items() if k != "masked_count"}}
                    finite = finite and math.isfinite(part["loss"])
                    for k, v in part.items():
                        # metric averages over the minibatch: per ratio unit, per masked token or per row
                        wk = units if k in _PER_UNIT else ntok if k in _PER_TOKEN else idx.numel()
                        sums[k] = sums.get(k, 0.0) + v * wk
                        wsum[k] = wsum.get(k, 0.0) + wk
                lr = oc.lr * _lr_factor(self.cfg, self.updates, total_updates)
                stepped, gn = self.optimizer_step(self.optimizer, params, grad_clip=oc.grad_clip, lr=lr,
                                                  loss_finite=finite)
                if stepped:
                    self.updates += 1
                    self.bad_streak = 0
                    grad_norms.append(gn)
                else:
                    skipped += 1
                    self.bad_streak += 1
        self.optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollout
        tot = D.all_gather_objects((sums, wsum), self.info)
        keys = {k for s, _ in tot for k in s}
        for k in sorted(keys):
            rec[k] = sum(s.get(k, 0.0) for s, _ in tot) / max(sum(w.get(k, 0.0) for _, w in tot), 1e-12)
        if grad_norms:  # identical on every rank (gradients are reduced before clipping)
            rec["grad_norm"] = sum(grad_norms) / len(grad_norms)
        rec["skipped_updates"] = skipped
        self.counters["skipped_updates_total"] += skipped
        rec["lr"] = oc.lr * _lr_factor(self.cfg, max(self.updates - 1, 0), total_updates)
        rec["mask_ratio"] = rows["mask_ratio"]
        rec["mean_abs_advantage"] = rows["mean_abs_adv"]
        self.counters["train_rows"] += n * oc.epochs
        self.counters["train_tokens"] += int(rows["loss_mask"].sum()) * oc.epochs
        return rec

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Checkpoint the current step (collective; every rank writes its shard)."""
        self.claim_folder()
        self.reshard()
        if self._abandoned is not None and self.info.is_main:
            # resumed from an older checkpoint because the newer ones were damaged: those belong to an
            # abandoned future; they go once this run saves its own
            for path in C.step_dirs(self.ckpt_dir):
                if C.checkpoint_step(path) > self._abandoned:
                    shutil.rmtree(path, ignore_errors=True)
        self._abandoned = None
        D.barrier(self.info)
        extra = {"updates": self.updates, "counters": dict(self.counters), "bad_streak": self.bad_streak,
                 "strategy": self.strategy, "config": to_dict(self.cfg)}
        path = C.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, extra=extra,
                               keep=self.cfg.train.keep_checkpoints, info=self.info)
        self._last_saved = self.step
        return path

    def clean_stale(self) -> None:
        """Remove temporary checkpoint directories a killed run left behind (rank 0; collective)."""
        if self.info.is_main:
            C.clean_stale(self.ckpt_dir)
        D.barrier(self.info)

    def resume(self, path: str | None = None) -> str:
        """Load the newest loadable checkpoint under ``out_dir`` (or ``path``) and trim the metrics log.
        A damaged newest checkpoint falls back to the one before; none loadable is a
        :class:`~slim_rl.checkpoint.CheckpointError`."""
        candidates = [path] if path else list(reversed(C.list_checkpoints(self.ckpt_dir)))
        if not candidates:
            raise C.CheckpointError(f"--resume: no checkpoint to resume in {self.ckpt_dir}")
        errors = []
        self.reshard()
        for cand in candidates:
            try:
                st = C.load_checkpoint(cand, self.model, self.optimizer, info=self.info)
            except C.CheckpointError as e:
                errors.append(str(e))
                if self.info.is_main:
                    print(f"slim-rl: warning: {e}; trying an older checkpoint", flush=True)
                continue
            break
        else:
            raise C.CheckpointError(f"--resume: no loadable checkpoint in {self.ckpt_dir}: {'; '.join(errors)}")
        self.step = st["step"]
        ex = st["extra"]
        self.updates = int(ex.get("updates", 0))
        self.bad_streak = int(ex.get("bad_streak", 0))
        self.counters.update(ex.get("counters", {}))
        self._resumed = True
        self._last_saved = self.step
        self._abandoned = self.step
        if self.info.is_main and os.path.exists(self.metrics_path):
            lines = []
            with open(self.metrics_path) as f:
                for line in f:
                    try:
                        lines.append(json.loads(line))
                    except ValueError:  # a line torn by the kill
                        continue
            keep = [r for r in lines if isinstance(r, dict) and r.get("step", 0) <= self.step]
            with open(self.metrics_path, "w") as f:
                for r in keep:
                    f.write(json.dumps(r) + "\n")
            self.history = keep
        D.barrier(self.info)
        return cand

    # ------------------------------------------------------------------ the loop
    def rl_step(self) -> dict[str, Any]:
        t0 = time.time()
        step = self.step + 1
        self.phase = f"RL step {step}, rollout"
        batch = self.rollout(step)
        t_roll = time.time() - t0
        self.phase = f"RL step {step}, update"
        rec = {"step": step, **self.update(batch, step)}
        st = batch.stats
        rec.update({
            "reward": float(batch.rewards.mean()) if len(batch) else 0.0,
            "response_len": float(batch.response_len.float().mean()) if len(batch) else 0.0,
            "ewc_per_step": st.get("ewc_sum", 0.0) / max(st.get("row_steps", 0.0), 1.0),
            "commits_per_step": st.get("commits_sum", 0.0) / max(st.get("row_steps", 0.0), 1.0),
            "tokens_per_forward": st.get("commits_sum", 0.0) / max(st.get("nfe", 0.0), 1.0),
            "finished_fraction": st.get("finished", 0.0) / max(len(batch), 1),
        })
        self.counters["rollouts"] += len(batch)
        rec.update({k: v for k, v in self.counters.items()})
        rec["rollout_s"] = t_roll
        rec["step_s"] = time.time() - t0
        self.step = step
        return rec

    def _check_streak(self) -> None:
        limit = self.cfg.train.max_skipped_updates
        if self.bad_streak >= limit:
            raise TrainingError(f"training stopped at RL step {self.step}: the last {self.bad_streak} updates "
                                f"in a row had a non-finite loss or gradient norm and were skipped (train.max_skipped_"
                                f"updates={limit}); the last checkpoint holds finite weights — lower optim.lr "
                                f"or check the objective settings")

    def train(self, *, resume: bool = False, progress: bool | None = None,
              on_step=None) -> list[dict[str, Any]]:
        """Run RL steps until ``train.steps`` (or ``train.time_limit_s``); the last step is always
        checkpointed. Returns the metric records."""
        try:
            return self._train(resume, progress, on_step)
        except Exception as e:
            if not (self.info.active and D.peer_failure(e)):
                raise
            D.abandon()
            first = " ".join(str(e).split())[:300]
            raise PeerFailure(f"rank {self.info.rank} of {self.info.world}: {self.phase}: a collective failed — "
                              f"another rank died or stalled longer than dist.timeout_s="
                              f"{self.cfg.dist.timeout_s:g} s ({type(e).__name__}: {first})") from None

    def _train(self, resume, progress, on_step) -> list[dict[str, Any]]:
        tc = self.cfg.train
        self.phase = "startup"
        self.clean_stale()
        if resume:
            self.phase = "resume"
            self.resume()
        if not self.overwrite:
            self.claim_folder()
        self.init_reference()
        show = tc.progress if progress is None else progress
        bar = None
        if show and self.info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc=f"RL ({self.cfg.objective.name})",
                       dynamic_ncols=True)
        t_start = time.time()
        try:
            while self.step < tc.steps:
                rec = self.rl_step()
                if self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
                    self.phase = f"RL step {self.step}, evaluation"
                    rec["eval_accuracy"] = self.evaluate()["accuracy"]
                self._log(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{rec['reward']:.2f}", loss=f"{rec.get('loss', 0.0):+.3f}",
                                    **({"eval": f"{rec['eval_accuracy']:.2f}"} if "eval_accuracy" in rec else {}))
                if on_step is not None:
                    on_step(rec)
                self._check_streak()
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.phase = f"RL step {self.step}, checkpoint"
                    self.save()
                if tc.time_limit_s and time.time() - t_start > tc.time_limit_s:
                    break
            if self._last_saved < self.step:  # the last step is always saved
                self.phase = f"RL step {self.step}, checkpoint"
                self.save()
        finally:
            if bar is not None:
                bar.close()
            if self._tb:
                self._tb.flush()
        return self.history
