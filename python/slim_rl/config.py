"""The trainer configuration: a dataclass tree (its defaults are the embedded demo's settings),
loaded from YAML, with ``section.key=value`` overrides, validated as a whole when it is loaded.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.steps=40"])

Every key is declared once, with :func:`key`: its default, a one-line meaning and its allowed values
(``choices``, or a range ``ge``/``gt``/``le``/``lt``). That one declaration drives the type and range
checks of :meth:`Config.validate`, and ``slim-rl config`` (:func:`describe`), which prints every key with
its default and meaning. Rules that tie several keys together live in :func:`_cross_checks`; checks that
look at the file system (a checkpoint's vocabulary against the task, data files) in :func:`check_files`.
To add a key, add one ``key(...)`` line to its section (and, if it depends on other keys, one rule).

Every problem is a :class:`ConfigError` (a ``ValueError``) whose message names the key, the value and
what is expected; the CLI prints it as one line (``slim-rl: error: ...``, exit code 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from slim_rl.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "to_dict", "from_dict", "save_config",
           "check_files", "describe", "key"]

def key(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """Declare a config key: default, meaning, and allowed values (floats must also be finite)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le,
                                            "lt": lt})


@dataclass
class LoraConfig:
    r: int = key(0, "LoRA rank (0 = off: every weight trains); > 0: only the adapters train and are checkpointed",
                 ge=0)
    alpha: float = key(16.0, "LoRA alpha (the adapter's output is scaled by alpha / r)", gt=0.0)
    dropout: float = key(0.0, "dropout on the adapters' input", ge=0.0, lt=1.0)
    target_modules: str = key("all-linear", "modules that get adapters: all-linear (every linear layer but the LM "
                              "head) or comma-separated module names, e.g. q_proj,k_proj,v_proj,o_proj")


@dataclass
class ModelConfig:
    family: str = key("sdar", "model family (decoding attention, logit shift)", choices=("sdar", "llada", "dream"))
    path: str = key("", "local checkpoint directory (config.json + weights); empty = a tiny random model")
    vocab_size: int = key(16, "vocabulary of the tiny random model (the addition task needs 16)", ge=4)
    hidden_size: int = key(128, "tiny model: hidden size", ge=2)
    num_layers: int = key(2, "tiny model: decoder layers", ge=1)
    num_heads: int = key(4, "tiny model: attention heads", ge=1)
    num_kv_heads: int = key(2, "tiny model: key/value heads (divides num_heads)", ge=1)
    intermediate_size: int = key(0, "tiny model: MLP width (0 = 2 x hidden_size)", ge=0)
    seed: int = key(0, "tiny model: weight seed", ge=0)
    dtype: str = key("float32", "compute dtype of forwards and rollouts (the trained weights are model.master_dtype)",
                     choices=("float32", "bfloat16", "float16"))
    master_dtype: str = key("float32", "dtype of the trained (master) weights, their gradients, their reduction "
                            "across ranks and the AdamW state; checkpoints hold it", choices=("float32", "bfloat16",
                                                                                              "float16"))
    low_precision_master: bool = key(False, "allow a bfloat16/float16 master_dtype with AdamW (updates smaller than "
                                     "half a weight's ulp round away: at lr 1e-6 most weights never change)")
    attention: str = key("dense", "dense: 4D mask + SDPA; slim: slim_ops block-diffusion attention (no NxN mask)",
                         choices=("dense", "slim"))
    gradient_checkpointing: bool = key(False, "activation checkpointing per decoder layer: recompute each layer's "
                                       "activations in the backward instead of keeping them")
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(),
                             metadata={"doc": "LoRA adapters through PEFT (r = 0: off, every weight trains)"})


@dataclass
class TaskConfig:
    name: str = key("addition", "task: the embedded addition task, the digit-shift task (long answers) or a "
                    "JSONL file", choices=("addition", "shift", "jsonl"))
    digits: int = key(2, "addition: digits per operand", ge=1, le=4)
    demo_error: float = key(0.6, "addition: how often the SFT demonstrator forgets a carry; shift: how often "
                            "it shifts the wrong way on a large shift", ge=0.0, le=1.0)
    length: int = key(20, "shift: digits per problem (the response is length + 1 tokens)", ge=4, le=64)
    flaw_from: int = key(3, "shift: the demonstrator errs on shifts k >= flaw_from (k != 5; 10 = never)", ge=1,
                         le=10)
    num_eval: int = key(200, "held-out prompts (never trained on)", ge=1)
    seed: int = key(0, "seed of the held-out split", ge=0)
    path: str = key("", "jsonl: data file, one {prompt, answer | tests} object per line")
    tokenizer: str = key("", "jsonl: local tokenizer directory")
    reward: str = key("math", "jsonl: math (answer equivalence) or code (tests in the sandbox)",
                      choices=("math", "code"))


@dataclass
class RolloutConfig:
    block_size: int = key(2, "K: tokens per block", ge=1, le=64)
    steps_per_block: int = key(0, "S: decode steps per block (0 = K)", ge=0)
    max_new_tokens: int = key(6, "response length budget", ge=1)
    strategy: str = key("tau_budget", "decode commit rule: the documented rules, the EB-sampler (entropy_bounded, "
                        "gamma), Fast-dLLM's factor rule (factor) or LLaDA's random remasking",
                        choices=("tau_budget", "threshold", "topk", "entropy_bounded", "factor", "random"))
    tau: float = key(0.9, "confidence threshold of the tau-budget rule", gt=0.0, lt=1.0)
    m: float = key(1.0, "tau-budget: commit budget multiplier (0 = floor)", ge=0.0)
    gamma: float = key(0.1, "entropy_bounded: gamma, commit the lowest-entropy slots while their summed entropy "
                       "minus the largest is <= gamma", ge=0.0)
    factor: float = key(1.0, "factor: commit the n most confident slots while (n + 1)(1 - c_n) < factor", gt=0.0)
    suppress_eos: bool = key(False, "EOS logits are -inf before every step: never predicted (LLaDA's "
                             "logits_eos_inf)")
    defer_eos: bool = key(False, "slots predicting EOS get confidence 0 (entropy +inf): committed only when the "
                          "floor needs them (LLaDA's confidence_eos_eot_inf)")
    cache: str = key("none", "llada / dream: none (exact, whole canvas every step), prefix or dual (Fast-dLLM's "
                     "caches, approximate); sdar decodes against its exact KV cache",
                     choices=("none", "prefix", "dual"))
    temperature: float = key(1.0, "sampling temperature of RL rollouts (0 = greedy)", ge=0.0)
    top_k: int = key(0, "top-k sampling (0 = off)", ge=0)
    top_p: float = key(1.0, "nucleus sampling (1 = off)", gt=0.0, le=1.0)
    group_size: int = key(8, "G: rollouts per prompt", ge=1)
    prompts_per_step: int = key(16, "Q: prompts per RL step (global, over all ranks)", ge=1)
    truncation_margin: int = key(-1, "reward 0 when len >= max_new_tokens - margin (-1: only 'no EOS' counts)",
                                 ge=-1)
    batch_size: int = key(0, "decode at most this many rows at once (0 = all)", ge=0)


@dataclass
class ObjectiveConfig:
    name: str = key("slim", "objective: SLIM-RL, the TraceRL baseline, or TraceRL's random-masking baseline",
                    choices=("slim", "tracerl", "random"))
    num_nodes: int = key(3, "slim: quadrature nodes n_q (training rows per response)", ge=1, le=64)
    nodes: str = key("gauss_legendre", "slim: mask levels of the n_q rows: Gauss-Legendre nodes and weights, or "
                     "uniform (each row draws t ~ U(0, 1), weight 1/n_q; an ablation)",
                     choices=("gauss_legendre", "uniform"))
    spread: float = key(0.2, "slim: sigma, spread of the per-block mask schedule", ge=0.0)
    shape: str = key("cosine", "slim: shape of the per-block mask schedule", choices=("cosine", "linear"))
    decreasing: bool = key(True, "slim: the mask probability decreases over the response blocks (the first block "
                           "is masked most; false mirrors it)")
    schedule_blocks: str = key("response", "slim: blocks the schedule spans", choices=("response", "padded"))
    shared_clean: bool = key(True, "slim: one clean stream + n_q noisy streams per response")
    shrink: int = key(1, "tracerl: decode steps merged per row", ge=1)
    level: str = key("sequence", "slim ratio level (tracerl and random always use token)",
                     choices=("sequence", "block", "token"))
    clip_low: float = key(0.1, "epsilon_lo of the sequence/block ratio clip", ge=0.0, lt=1.0)
    clip_high: float = key(0.1, "epsilon_hi of the sequence/block ratio clip", ge=0.0)
    clip_token: float = key(0.2, "epsilon of the token ratio clip", ge=0.0, lt=1.0)
    kl_coef: float = key(0.01, "beta: weight of the KL penalty to the step's starting policy", ge=0.0)
    kl_estimator: str = key("k3", "KL estimator", choices=("k1", "k2", "k3"))
    kl_reference: str = key("old", "KL against the step's starting policy (old) or a frozen copy of the model "
                            "as RL starts (ref; saved in the run folder)", choices=("old", "ref"))
    clip_delta: float = key(0.0, "cap delta of the unclipped ratio, J = min(min(s, delta)A, clip(s)A) (0 = off; "
                            "TRL/Liger delta, verl dual-clip clip_ratio_c)", ge=0.0)
    loss_agg: str = key("spec", "loss aggregation: spec (1/L1 norms of the paper) or as verl/TRL name them",
                        choices=("spec", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"))
    post_tokens: int = key(0, "also train the first n pad positions after each response (TraceRL post_num)",
                           ge=0)
    random_low: float = key(0.1, "random: lower bound of the per-block Uniform(low, high) mask rate", ge=0.0,
                            le=1.0)
    random_high: float = key(0.9, "random: upper bound of the per-block mask rate", ge=0.0, le=1.0)
    random_rows: int = key(1, "random: masked rows per response (TraceRL mask_times_per_sample)", ge=1, le=64)
    coupled: bool = key(False, "random: pair every masked row with its complement (TraceRL coupled)")


@dataclass
class AdvantageConfig:
    kind: str = key("dr_grpo", "advantage: reward minus group mean (dr_grpo) or z-score", choices=("dr_grpo", "zscore"))
    filter_groups: bool = key(True, "drop prompt groups whose accuracy is outside [filter_low, filter_high]")
    filter_low: float = key(0.2, "drop groups with accuracy < low", ge=0.0, le=1.0)
    filter_high: float = key(0.8, "drop groups with accuracy > high", ge=0.0, le=1.0)


@dataclass
class OptimConfig:
    lr: float = key(1e-4, "AdamW learning rate of RL", gt=0.0)
    weight_decay: float = key(0.0, "AdamW weight decay", ge=0.0)
    beta1: float = key(0.9, "AdamW beta1", ge=0.0, lt=1.0)
    beta2: float = key(0.999, "AdamW beta2", ge=0.0, lt=1.0)
    eps: float = key(1e-8, "AdamW epsilon", gt=0.0)
    grad_clip: float = key(1.0, "clip the global gradient norm to this (0 = no clipping)", ge=0.0)
    epochs: int = key(1, "E: passes over each step's rows", ge=1)
    minibatches: int = key(2, "optimizer steps per epoch (the demo's 2: the second minibatch is off-policy, so the "
                           "clipped ratio and the KL act)", ge=1)
    micro_batch_rows: int = key(512, "rows per forward (gradient accumulation)", ge=1)
    warmup_steps: int = key(0, "linear LR warm-up, in optimizer steps", ge=0)
    schedule: str = key("constant", "LR schedule over train.steps", choices=("constant", "cosine"))


@dataclass
class SFTConfig:
    steps: int = key(600, "masked-diffusion SFT steps before RL (0 = no SFT stage)", ge=0)
    batch_size: int = key(128, "demonstrations per SFT step (global)", ge=1)
    lr: float = key(2e-3, "SFT peak learning rate (cosine decay)", gt=0.0)
    warmup_steps: int = key(50, "SFT linear warm-up steps", ge=0)
    weight_decay: float = key(0.0, "SFT weight decay", ge=0.0)


@dataclass
class EvalConfig:
    every: int = key(10, "RL steps between greedy evaluations (0 = only before/after)", ge=0)
    num_prompts: int = key(0, "held-out prompts per evaluation (0 = all)", ge=0)


@dataclass
class TrainConfig:
    steps: int = key(30, "RL steps", ge=0)
    seed: int = key(0, "seed of every random choice (each step's generators are seeded by (seed, step))", ge=0)
    out_dir: str = key("runs/demo", "run folder: config, metrics, checkpoints, summary, plots")
    checkpoint_every: int = key(10, "RL steps between checkpoints (0 = only the final one)", ge=0)
    keep_checkpoints: int = key(2, "newest checkpoints kept (0 = all)", ge=0)
    max_skipped_updates: int = key(3, "stop after this many consecutive updates skipped for a non-finite loss "
                                      "or gradient norm", ge=1)
    tensorboard: bool = key(True, "also write TensorBoard scalars (when installed)")
    progress: bool = key(True, "progress bars")
    threads: int = key(1, "torch intra-op threads (0 = leave as is)", ge=0)
    time_limit_s: float = key(300.0, "stop RL early after this many seconds (0 = no limit)", ge=0.0)


@dataclass
class DistConfig:
    strategy: str = key("ddp", "multi-process layout: DistributedDataParallel or FSDP2 fully_shard",
                        choices=("ddp", "fsdp"))
    backend: str = key("auto", "process-group backend (auto: nccl on CUDA, gloo on CPU)",
                       choices=("auto", "gloo", "nccl"))
    cpu_offload: bool = key(False, "fsdp: keep parameters, gradients and AdamW state in CPU memory (FSDP2 "
                            "CPUOffloadPolicy; the optimizer steps on the CPU)")
    timeout_s: float = key(600.0, "a collective that waits longer than this (a rank died or stalls) ends the run "
                           "on the ranks still alive, with one line naming the phase and the rank", gt=0)


def _cross_checks(c: Config) -> list[str]:
    """Rules that tie keys together; returns the problems found."""
    bad: list[str] = []
    m = c.model
    if not m.path and m.num_heads % m.num_kv_heads:
        bad.append(f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads ({m.num_kv_heads})")
    if not m.path and (m.hidden_size % m.num_heads or (m.hidden_size // m.num_heads) % 2):
        bad.append(f"model.hidden_size ({m.hidden_size}) / model.num_heads ({m.num_heads}) must be an even "
                   "integer (the rotary head dimension)")
    if c.task.name in ("addition", "shift"):
        if not m.path and m.vocab_size != 16:
            bad.append(f"model.vocab_size must be 16 for task.name={c.task.name} (its vocabulary), got "
                       f"{m.vocab_size}")
    if c.task.name == "addition":
        n = 10 ** c.task.digits
        if c.task.num_eval >= n * n // 2:
            bad.append(f"task.num_eval must be < {n * n // 2} for {c.task.digits}-digit addition, "
                       f"got {c.task.num_eval}")
    elif c.task.name == "jsonl":
        for k in ("path", "tokenizer"):
            if not getattr(c.task, k):
                bad.append(f"task.{k} must be set for task.name=jsonl")
    if m.master_dtype != "float32" and not m.low_precision_master:
        bad.append(f"model.master_dtype={m.master_dtype} with AdamW loses the updates (an update below half a "
                   f"{m.master_dtype} step rounds away: at lr 1e-6 ~2% of the weights ever change); keep "
                   "model.master_dtype=float32 (model.dtype sets the compute dtype) or set "
                   "model.low_precision_master=true")
    elif m.master_dtype != "float32" and m.dtype != m.master_dtype:
        bad.append(f"model.dtype ({m.dtype}) must equal model.master_dtype ({m.master_dtype}) when the master is "
                   "in low precision")
    if c.dist.cpu_offload and c.dist.strategy != "fsdp":
        bad.append(f"dist.cpu_offload=true needs dist.strategy=fsdp (FSDP2 CPUOffloadPolicy), got "
                   f"dist.strategy={c.dist.strategy}")
    if m.lora.r > 0 and not m.lora.target_modules.strip():
        bad.append("model.lora.target_modules must name modules (or all-linear)")
    r = c.rollout
    if r.steps_per_block > r.block_size:
        bad.append(f"rollout.steps_per_block ({r.steps_per_block}) must be <= rollout.block_size ({r.block_size})")
    if r.cache != "none" and m.family not in ("llada", "dream"):
        bad.append(f"rollout.cache={r.cache} needs model.family llada or dream (sdar decodes against its exact KV "
                   f"cache), got model.family={m.family}")
    if r.truncation_margin >= r.max_new_tokens:
        bad.append(f"rollout.truncation_margin ({r.truncation_margin}) must be < rollout.max_new_tokens "
                   f"({r.max_new_tokens})")
    o = c.objective
    if o.clip_delta and o.clip_delta <= 1.0:
        bad.append(f"objective.clip_delta must be 0 (off) or > 1, got {o.clip_delta}")
    if o.random_low > o.random_high:
        bad.append(f"objective.random_low ({o.random_low}) must be <= objective.random_high ({o.random_high})")
    if o.coupled and o.name != "random":
        bad.append(f"objective.coupled=true needs objective.name=random, got {o.name}")
    a = c.advantage
    if a.filter_low > a.filter_high:
        bad.append(f"advantage.filter_low ({a.filter_low}) must be <= advantage.filter_high ({a.filter_high})")
    return bad


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> Config:
        """Check every key's type and range and the cross-key rules; returns self or raises
        :class:`ConfigError` listing the first problem (``and N more`` when there are several)."""
        bad: list[str] = []
        for name, f, v in _leaves(self):
            msg = _check_value(name, v, f)
            if msg:
                bad.append(msg)
        if not bad:
            bad = _cross_checks(self)
        if bad:
            more = f" (and {len(bad) - 1} more: {'; '.join(bad[1:])})" if len(bad) > 1 else ""
            raise ConfigError(f"config: {bad[0]}{more}")
        return self


def _leaves(node, prefix: str = ""):
    """(dotted name, field, value) of every key under a config dataclass, nested sections included."""
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if dataclasses.is_dataclass(v):
            yield from _leaves(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, v


_TYPES = {int: "an int", float: "a number", str: "a string", bool: "true/false"}


def _range_text(meta: dict) -> str:
    parts = []
    for k, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(k) is not None:
            parts.append(f"{sym} {meta[k]}")
    return " and ".join(parts)


def _check_value(name: str, v: Any, f: dataclasses.Field) -> str | None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and v not in choices:
        return f"{name} must be one of {'|'.join(map(str, choices))}, got {v!r}"
    if isinstance(v, float) and not math.isfinite(v):
        return f"{name} must be a finite number, got {v!r}"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        for k, ok in (("gt", lambda a, b: a > b), ("ge", lambda a, b: a >= b), ("lt", lambda a, b: a < b),
                      ("le", lambda a, b: a <= b)):
            lim = meta.get(k)
            if lim is not None and not ok(v, lim):
                return f"{name} must be {_range_text(meta)}, got {v!r}"
    return None


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config: {where} must be a mapping of keys, got {value!r}")
        return from_dict(typ, value, where)
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config: {where} must be true/false, got {value!r}")
    if typ is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {where} must be an int, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config: {where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"config: {where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are errors."""
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        what = "section(s)" if where == "config" else "key(s)"
        raise ConfigError(f"config: unknown {what} {sorted(unknown)} in {where}; valid: {sorted(types_)}")
    kwargs = {k: _coerce(v, types_[k], k if where == "config" else f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply ``section.key=value`` strings (value parsed as YAML) to a copy of ``cfg``; validated."""
    data = to_dict(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, raw = item.split("=", 1)
        parts = k.strip().split(".")
        node = data
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: unknown section {p!r}; valid: {sorted(node)}")
            node = node[p]
        if len(parts) < 2 or parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ConfigError(f"override {item!r}: unknown key {parts[-1]!r}; valid: "
                              f"{sorted(x for x in node if not isinstance(node[x], dict))}")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value ({str(e).splitlines()[0]})") from None
    return from_dict(Config, data).validate()


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (if given) <- overrides; the whole result validated."""
    data: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = from_dict(Config, data)
    return apply_overrides(cfg, overrides)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


_ADDITION_IDS = {"vocab_size": 16, "mask_token_id": 15, "eos_token_id": 14, "pad_token_id": 13}


def check_files(cfg: Config) -> Config:
    """The checks that read files, before any model is built: ``model.path`` is a checkpoint directory
    whose vocabulary (size and special ids) fits the task; a JSONL task's data file and tokenizer exist
    and the tokenizer's vocabulary fits the model. Raises :class:`ConfigError`."""
    mp = cfg.model.path
    vocab = None if mp else cfg.model.vocab_size
    if mp:
        cj = os.path.join(mp, "config.json")
        if not os.path.isfile(cj):
            raise ConfigError(f"config: model.path {mp!r} is not a checkpoint directory (no config.json)")
        try:
            with open(cj) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config: {cj} is not readable JSON ({e})") from None
        vocab = raw.get("vocab_size")
        if cfg.task.name in ("addition", "shift"):
            for k, want in _ADDITION_IDS.items():
                got = raw.get(k)
                if isinstance(got, list):
                    got = got[0] if got else None
                if got != want:
                    raise ConfigError(f"config: the checkpoint {mp!r} does not fit task.name={cfg.task.name}: its "
                                      f"{k} is {got}, the task's vocabulary needs {want}")
    if cfg.task.name == "jsonl":
        if not os.path.isfile(cfg.task.path):
            raise ConfigError(f"config: task.path {cfg.task.path!r} does not exist")
        if not os.path.isdir(cfg.task.tokenizer):
            raise ConfigError(f"config: task.tokenizer {cfg.task.tokenizer!r} is not a directory")
        tv = _tokenizer_vocab(cfg.task.tokenizer)
        if tv is not None and vocab is not None and tv > int(vocab):
            raise ConfigError(f"config: the tokenizer {cfg.task.tokenizer!r} has {tv} tokens but the model's "
                              f"vocabulary is {vocab}")
    return cfg


def _tokenizer_vocab(path: str) -> int | None:
    """Token count of a tokenizer.json (base vocabulary + added tokens), without loading transformers."""
    tj = os.path.join(path, "tokenizer.json")
    try:
        with open(tj) as f:
            raw = json.load(f)
        ids = list(raw.get("model", {}).get("vocab", {}).values()) if isinstance(
            raw.get("model", {}).get("vocab"), dict) else []
        ids += [t["id"] for t in raw.get("added_tokens", [])]
        return max(ids) + 1 if ids else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe(cfg: Config | None = None) -> str:
    """Every key with its default (or its value in ``cfg``), allowed values and meaning (``slim-rl config``).
    The output is valid YAML: it can be saved and edited as a config file."""
    what = "value in the given config" if cfg is not None else "default"
    lines = [f"# slim-rl configuration: every key, its {what} and meaning.",
             "# Set keys in a YAML file (--config FILE) or as section.key=value overrides."]
    base = cfg if cfg is not None else Config()

    def section(node, indent: str) -> None:
        types_ = _field_types(type(node))
        for f in dataclasses.fields(node):
            v = getattr(node, f.name)
            if dataclasses.is_dataclass(v):
                lines.append(f"{indent}{f.name}:".ljust(34) + f"  # section: {f.metadata.get('doc', '')}")
                section(v, indent + "  ")
                continue
            meta = f.metadata
            allowed = "|".join(map(str, meta["choices"])) if meta.get("choices") else _range_text(meta)
            typ = types_[f.name].__name__ if isinstance(types_[f.name], type) else str(types_[f.name])
            val = yaml.safe_dump(v, default_flow_style=True).strip()
            if val.endswith("..."):
                val = val[:-3].strip()
            doc = meta.get("doc", "")
            lines.append(f"{indent}{f.name}: {val}".ljust(34) + f"  # {typ}{' ' + allowed if allowed else ''}: {doc}")

    for sec in dataclasses.fields(base):
        lines.append(f"{sec.name}:")
        section(getattr(base, sec.name), "  ")
    return "\n".join(lines)
