"""Config tree: YAML loading, overrides, validation."""

from __future__ import annotations

import pytest

from slim_rl.config import Config, apply_overrides, load_config, save_config, to_dict


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
    (["objective.name=ppo"], "objective.name must be slim|tracerl"),
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
