"""slim_rl.models: tiny random models of each family and the offline loader."""

from __future__ import annotations

import json
import os

import pytest
import torch

from slim_rl.models import FAMILIES, load, model_info, tiny


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded (and do not spin-wait on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_attributes_and_forward(family):
    m = tiny(family, vocab_size=40, seed=1, hidden_size=64, num_layers=2)
    info = model_info(m)
    assert info["family"] == family
    assert (info["mask_id"], info["eos_id"], info["pad_id"]) == (39, 38, 37)
    assert info["shift"] == (1 if family == "dream" else 0)
    assert info["block_causal"] == (family == "sdar")
    x = torch.randint(0, 37, (2, 9))
    logits = m(input_ids=x).logits
    assert logits.shape == (2, 9, 40) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_is_deterministic_in_seed(family):
    a, b, c = tiny(family, seed=5), tiny(family, seed=5), tiny(family, seed=6)
    x = torch.randint(0, 29, (1, 7))
    assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)
    assert not torch.equal(a(input_ids=x).logits, c(input_ids=x).logits)


def test_tiny_validates():
    with pytest.raises(ValueError, match="family must be one of"):
        tiny("gpt2")
    with pytest.raises(ValueError, match="vocab_size must be >= 4"):
        tiny("sdar", vocab_size=3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tiny("sdar", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="mask_id and eos_id must differ"):
        tiny("sdar", mask_id=5, eos_id=5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny("sdar", vocab_size=16, mask_id=16)
    with pytest.raises(TypeError, match="lacks attribute"):
        model_info(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family,foreign_type", [("sdar", "sdar"), ("dream", "Dream"), ("llada", None)])
def test_load_round_trip_offline(tmp_path, family, foreign_type):
    m = tiny(family, seed=2, mask_id=3, eos_id=4, pad_id=5)
    m.save_pretrained(tmp_path)
    if foreign_type is not None:  # released SDAR / Dream checkpoints name their own model_type
        cfg_file = os.path.join(tmp_path, "config.json")
        with open(cfg_file) as f:
            raw = json.load(f)
        raw["model_type"] = foreign_type
        raw["architectures"] = [foreign_type + "ForCausalLM"]
        with open(cfg_file, "w") as f:
            json.dump(raw, f)
    m2 = load(tmp_path, family)
    assert (m2.mask_id, m2.eos_id, m2.pad_id, m2.family, m2.shift) == (3, 4, 5, family, m.shift)
    x = torch.randint(0, 29, (2, 6))
    assert torch.equal(m(input_ids=x).logits, m2(input_ids=x).logits)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path, "sdar")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llada"}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load(tmp_path, "llada")
