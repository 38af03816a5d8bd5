"""The trainer configuration: a dataclass tree (its defaults are the embedded demo's settings),
loaded from YAML, with ``section.key=value`` overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.steps=40"])

Unknown sections / keys are errors (with the list of valid names), values are parsed as YAML scalars
and checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["Config", "load_config", "apply_overrides", "to_dict", "from_dict"]


@dataclass
class ModelConfig:
    family: str = "sdar"            # sdar | llada | dream
    path: str = ""                  # local checkpoint directory; empty = a tiny random model
    vocab_size: int = 16
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 0      # 0 = 2·hidden
    seed: int = 0
    dtype: str = "float32"          # float32 | bfloat16
    attention: str = "dense"        # dense: 4D mask + SDPA | slim: slim_ops block-diffusion attention (no N×N)


@dataclass
class TaskConfig:
    name: str = "addition"          # addition | jsonl
    digits: int = 2
    demo_error: float = 0.6
    num_eval: int = 200
    seed: int = 0
    path: str = ""                  # jsonl: data file
    tokenizer: str = ""             # jsonl: local tokenizer directory
    reward: str = "math"            # jsonl: math | code


@dataclass
class RolloutConfig:
    block_size: int = 2             # K
    steps_per_block: int = 0        # S (0 = K)
    max_new_tokens: int = 6
    strategy: str = "tau_budget"
    tau: float = 0.9
    m: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    group_size: int = 8             # G rollouts per prompt
    prompts_per_step: int = 16      # Q prompts per RL step (global, over all ranks)
    truncation_margin: int = -1     # r = 0 when len >= max_new_tokens - margin; -1: only "no EOS" counts
    batch_size: int = 0             # decode at most this many rows at once (0 = all)


@dataclass
class ObjectiveConfig:
    name: str = "slim"              # slim | tracerl
    num_nodes: int = 3
    spread: float = 0.2
    shape: str = "cosine"
    decreasing: bool = True
    schedule_blocks: str = "response"
    shared_clean: bool = True       # slim: one clean stream + n_q noisy streams per response (SPEC §3.4)
    shrink: int = 1                 # tracerl
    level: str = "sequence"         # slim ratio level: sequence | block | token (tracerl: token)
    clip_low: float = 0.1
    clip_high: float = 0.1
    clip_token: float = 0.2
    kl_coef: float = 0.01
    kl_estimator: str = "k3"


@dataclass
class AdvantageConfig:
    kind: str = "dr_grpo"           # dr_grpo | zscore
    filter_groups: bool = True
    filter_low: float = 0.2         # drop groups with accuracy < low
    filter_high: float = 0.8        # ... or > high


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    epochs: int = 1                 # E passes over the step's rows
    minibatches: int = 1            # optimizer steps per epoch
    micro_batch_rows: int = 512     # rows per forward (gradient accumulation)
    warmup_steps: int = 0
    schedule: str = "constant"      # constant | cosine (over train.steps)


@dataclass
class SFTConfig:
    steps: int = 600                # 0 = no SFT stage
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0


@dataclass
class EvalConfig:
    every: int = 10                 # RL steps between greedy evaluations (0 = only before/after)
    num_prompts: int = 0            # 0 = the task's whole held-out set


@dataclass
class TrainConfig:
    steps: int = 30
    seed: int = 0
    out_dir: str = "runs/demo"
    checkpoint_every: int = 10      # 0 = never
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    threads: int = 1                # torch intra-op threads (0 = leave as is; 1 suits the tiny demo model)
    time_limit_s: float = 300.0     # stop RL early after this many seconds (0 = no limit)
    stop_after: int = 0             # testing: exit abruptly after this many steps (0 = off)


@dataclass
class DistConfig:
    strategy: str = "ddp"           # ddp | fsdp (FSDP2 fully_shard, for models that do not fit one device)
    backend: str = "auto"           # auto | gloo | nccl


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
        """Check values that would otherwise fail deep inside the loop; returns self."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"config: {msg}")

        need(self.model.family in ("sdar", "llada", "dream"), f"model.family must be sdar|llada|dream, "
             f"got {self.model.family!r}")
        need(self.objective.name in ("slim", "tracerl"), f"objective.name must be slim|tracerl, "
             f"got {self.objective.name!r}")
        need(self.objective.level in ("sequence", "block", "token"), "objective.level must be "
             f"sequence|block|token, got {self.objective.level!r}")
        need(self.advantage.kind in ("dr_grpo", "zscore"), f"advantage.kind must be dr_grpo|zscore, "
             f"got {self.advantage.kind!r}")
        need(self.rollout.group_size >= 1 and self.rollout.prompts_per_step >= 1,
             "rollout.group_size and rollout.prompts_per_step must be >= 1")
        need(self.rollout.block_size >= 1 and self.rollout.max_new_tokens >= 1,
             "rollout.block_size and rollout.max_new_tokens must be >= 1")
        need(self.optim.epochs >= 1 and self.optim.minibatches >= 1 and self.optim.micro_batch_rows >= 1,
             "optim.epochs, optim.minibatches and optim.micro_batch_rows must be >= 1")
        need(self.optim.schedule in ("constant", "cosine"), f"optim.schedule must be constant|cosine, "
             f"got {self.optim.schedule!r}")
        need(self.dist.strategy in ("ddp", "fsdp"),
             f"dist.strategy must be ddp|fsdp, got {self.dist.strategy!r}")
        need(self.model.attention in ("dense", "slim"), f"model.attention must be dense|slim, "
             f"got {self.model.attention!r}")
        need(self.model.dtype in ("float32", "bfloat16", "float16"), f"model.dtype must be float32|bfloat16|"
             f"float16, got {self.model.dtype!r}")
        return self


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ValueError(f"config: {where} must be a mapping, got {value!r}")
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
        raise ValueError(f"config: {where} must be true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config: {where} must be an int, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config: {where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"config: {where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are errors."""
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ValueError(f"config: unknown key(s) {sorted(unknown)} in {where}; valid: {sorted(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply ``section.key=value`` strings (value parsed as YAML) to a copy of ``cfg``."""
    data = to_dict(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"override {item!r}: unknown section {p!r}; valid: {sorted(node)}")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"override {item!r}: unknown key {parts[-1]!r}; valid: {sorted(node)}")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return from_dict(Config, data).validate()


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file (if given) ← overrides; validated."""
    data: dict = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
    cfg = from_dict(Config, data)
    return apply_overrides(cfg, overrides)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
