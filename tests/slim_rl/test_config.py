"""Config tree: YAML loading, overrides, validation of every key (ranges, enums, cross-key rules,
vocabulary vs task), and ``describe`` listing every key."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from slim_rl.config import (
    Config,
    ConfigError,
    apply_overrides,
    check_files,
    describe,
    load_config,
    save_config,
    to_dict,
)


def test_committed_configs_load(tmp_path):
    demo = load_config("configs/demo.yaml")
    assert to_dict(demo) == to_dict(Config())  # the YAML spells out the defaults
    tr = load_config("configs/tracerl_compare.yaml")
    assert tr.objective.name == "tracerl" and tr.rollout == demo.rollout and tr.optim == demo.optim
    big = load_config("configs/sdar4b.yaml")
    assert (big.rollout.block_size, big.rollout.tau, big.rollout.m, big.rollout.group_size) == (16, 0.9, 1.0, 8)
    assert (big.objective.num_nodes, big.objective.spread, big.objective.clip_low, big.objective.kl_coef) == \
        (3, 0.2, 0.1, 0.01)
    p = tmp_path / "c.yaml"
    save_config(big, str(p))
    assert to_dict(load_config(str(p))) == to_dict(big)


def test_overrides_parse_types():
    c = apply_overrides(Config(), ["optim.lr=3e-4", "train.steps=7", "objective.name=tracerl",
                                   "objective.decreasing=false", "model.path=/x/y"])
    assert c.optim.lr == pytest.approx(3e-4) and isinstance(c.optim.lr, float)
    assert c.train.steps == 7 and c.objective.name == "tracerl" and c.objective.decreasing is False
    assert c.model.path == "/x/y"


@pytest.mark.parametrize("ov,msg", [
    (["optim.lrr=1"], "unknown key 'lrr'"),
    (["optimizer.lr=1"], "unknown section 'optimizer'"),
    (["train.steps=abc"], "train.steps must be an int"),
    (["objective.name=ppo"], "objective.name must be one of slim|tracerl"),
    (["optim.lr"], "section.key=value"),
    (["objective.decreasing=3"], "true/false"),
])
def test_bad_overrides_say_what_is_wrong(ov, msg):
    with pytest.raises(ValueError, match=msg):
        apply_overrides(Config(), ov)


def test_unknown_yaml_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  learning_rate: 1.0\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(str(p))


@pytest.mark.parametrize("ov,msg", [
    ("rollout.tau=1.5", "rollout.tau must be > 0.0 and < 1.0, got 1.5"),
    ("sft.warmup_steps=-5", "sft.warmup_steps must be >= 0, got -5"),
    ("train.steps=-5", "train.steps must be >= 0, got -5"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0, got -1"),
    ("train.keep_checkpoints=-3", "train.keep_checkpoints must be >= 0, got -3"),
    ("dist.backend=foo", "dist.backend must be one of auto|gloo|nccl, got 'foo'"),
    ("dist.strategy=zero3", "dist.strategy must be one of ddp|fsdp"),
    ("sft.batch_size=0", "sft.batch_size must be >= 1, got 0"),
    ("objective.kl_coef=nan", "objective.kl_coef must be a finite number, got nan"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.lr=0", "optim.lr must be > 0.0"),
    ("optim.beta2=1.0", "optim.beta2 must be >= 0.0 and < 1.0"),
    ("objective.clip_low=1.0", "objective.clip_low must be >= 0.0 and < 1.0"),
    ("rollout.block_size=65", "rollout.block_size must be >= 1 and <= 64"),
    ("rollout.steps_per_block=3", "rollout.steps_per_block (3) must be <= rollout.block_size (2)"),
    ("advantage.filter_low=0.9", "advantage.filter_low (0.9) must be <= advantage.filter_high (0.8)"),
    ("model.vocab_size=32", "model.vocab_size must be 16 for task.name=addition"),
    ("model.num_kv_heads=3", "model.num_heads (4) must be a multiple of model.num_kv_heads (3)"),
    ("task.num_eval=5000", "task.num_eval must be < 5000"),
    ("task.name=jsonl", "task.path must be set for task.name=jsonl"),
    ("train.max_skipped_updates=0", "train.max_skipped_updates must be >= 1"),
])
def test_every_bad_value_is_named(ov, msg):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", [ov])
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


def test_several_problems_are_all_reported():
    with pytest.raises(ConfigError, match=r"sft.lr must be > 0.0, got -1.0 \(and 1 more: train.steps must be >= 0"):
        load_config(None, ["train.steps=-1", "sft.lr=-1"])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    p = tmp_path / "bad.yaml"
    p.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))
    p.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="optim must be a mapping"):
        load_config(str(p))


def test_checkpoint_vocabulary_must_fit_the_task(tmp_path):
    """model.path: the checkpoint's config.json (vocabulary, special ids) is checked before any model is built."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"vocab_size": 32, "mask_token_id": 31, "eos_token_id": 30,
                                                "pad_token_id": 29, "model_type": "qwen3"}))
    cfg = load_config(None, [f"model.path={ck}"])
    with pytest.raises(ConfigError, match="does not fit task.name=addition: its vocab_size is 32"):
        check_files(cfg)
    (ck / "config.json").write_text(json.dumps({"vocab_size": 16, "mask_token_id": 15, "eos_token_id": 14,
                                                "pad_token_id": 13, "model_type": "qwen3"}))
    check_files(cfg)
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        check_files(load_config(None, [f"model.path={tmp_path / 'none'}"]))


def test_a_model_that_does_not_fit_the_task_is_refused():
    """The trainer checks the built model's vocabulary against the task (no silent 0-row training)."""
    from slim_rl import models
    from slim_rl.trainer import Trainer

    cfg = load_config(None, ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                             "model.num_kv_heads=1", "train.out_dir=/tmp/unused"])
    with pytest.raises(ConfigError, match="vocabulary size is 32, the task needs 16"):
        Trainer(cfg, model=models.tiny("sdar", vocab_size=32, hidden_size=32, num_layers=1, num_heads=2,
                                       num_kv_heads=1))


def test_describe_lists_every_key_with_its_default_and_meaning():
    text = describe()
    parsed = yaml.safe_load(text)               # valid YAML: a commented config file
    assert parsed == to_dict(Config())
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.type if isinstance(sec.type, type) else type(getattr(Config(), sec.name))):
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{f.name}:"))
            assert "# " in line and len(line.split("# ", 1)[1]) > 10, line
    resolved = yaml.safe_load(describe(load_config(None, ["optim.lr=3e-4"])))
    assert resolved["optim"]["lr"] == pytest.approx(3e-4)
