"""Rollout options of the trainer: the peers' decode rules (rollout.strategy entropy_bounded / factor / random with
rollout.gamma / rollout.factor), EOS suppression or deferral and the LLaDA / Dream caches (rollout.cache), parsed
from overrides, checked, and handed to slim_rl.generate by a real rollout. Tiny sizes (CPU, a few seconds)."""

from __future__ import annotations

import pytest
import torch

import slim_rl.generate as gen_mod
from slim_rl.config import ConfigError, load_config

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "sft.steps=0", "rollout.prompts_per_step=2", "rollout.group_size=2", "task.num_eval=16",
        "eval.every=0", "train.tensorboard=false", "train.threads=1", "train.progress=false"]


def test_rollout_strategy_keys_parse():
    for strategy, extra, attr, want in [("entropy_bounded", "rollout.gamma=0.35", "gamma", 0.35),
                                        ("factor", "rollout.factor=2.5", "factor", 2.5),
                                        ("random", "rollout.cache=none", "cache", "none")]:
        cfg = load_config("configs/demo.yaml", [f"rollout.strategy={strategy}", extra])
        assert cfg.rollout.strategy == strategy and getattr(cfg.rollout, attr) == want
    cfg = load_config(None, ["model.family=llada", "rollout.cache=dual", "rollout.suppress_eos=true",
                             "rollout.defer_eos=true"])
    assert (cfg.rollout.cache, cfg.rollout.suppress_eos, cfg.rollout.defer_eos) == ("dual", True, True)
    d = load_config(None)
    assert (d.rollout.strategy, d.rollout.gamma, d.rollout.factor, d.rollout.cache) == ("tau_budget", 0.1, 1.0,
                                                                                       "none")


@pytest.mark.parametrize("ov,msg", [
    (["rollout.strategy=greedy"], "rollout.strategy must be one of"),
    (["rollout.gamma=-0.5"], "rollout.gamma must be >= 0.0, got -0.5"),
    (["rollout.factor=0"], "rollout.factor must be > 0.0, got 0.0"),
    (["rollout.cache=full"], "rollout.cache must be one of"),
    (["rollout.cache=dual"], "rollout.cache=dual needs model.family llada or dream"),
    (["model.family=sdar", "rollout.cache=prefix"], "got model.family=sdar"),
    (["rollout.suppress_eos=3"], "rollout.suppress_eos must be true/false"),
])
def test_bad_rollout_values_are_named(ov, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, ov)


def _trainer(extra):
    from slim_rl.trainer import Trainer

    torch.manual_seed(0)
    return Trainer(load_config(None, TINY + ["train.out_dir=/tmp/unused", *extra]))


@pytest.mark.parametrize("extra,want", [
    (["rollout.strategy=entropy_bounded", "rollout.gamma=0.4", "rollout.suppress_eos=true"],
     dict(strategy="entropy_bounded", gamma=0.4, cache="none", defer_ids=None)),
    (["rollout.strategy=factor", "rollout.factor=1.5", "rollout.defer_eos=true"],
     dict(strategy="factor", factor=1.5, suppress_ids=None)),
    (["model.family=llada", "rollout.strategy=random", "rollout.cache=dual", "rollout.block_size=4",
      "rollout.max_new_tokens=8"], dict(strategy="random", cache="dual", suppress_ids=None, defer_ids=None)),
])
def test_rollout_hands_the_options_to_generate(monkeypatch, extra, want):
    calls = []
    real = gen_mod.generate

    def spy(model, prompts, **kw):
        out = real(model, prompts, **kw)
        calls.append((kw, out))
        return out

    monkeypatch.setattr(gen_mod, "generate", spy)
    tr = _trainer(extra)
    batch = tr.rollout(0)
    assert len(calls) == 1 and len(batch) == 4
    kw, out = calls[0]
    for k, v in want.items():
        assert kw[k] == v, (k, kw[k], v)
    eos = tr.eos_id
    if "rollout.suppress_eos=true" in extra:
        assert kw["suppress_ids"] == [eos]
        assert not (out.tokens == eos).any() and not out.finished.any()  # EOS never predicted
    if "rollout.defer_eos=true" in extra:
        assert kw["defer_ids"] == [eos]
    assert kw["temperature"] == tr.cfg.rollout.temperature
    assert out.tokens.shape == (4, tr.cfg.rollout.max_new_tokens)
