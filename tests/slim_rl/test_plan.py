"""``slim-rl plan`` against measurement: the predicted peak memory of a training micro-batch is within 20 %
of the peak resident memory measured on the CPU (a fresh process per shape, RSS above the baseline), on
three shapes of different size and settings; and the plan of configs/sdar4b.yaml prints its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")])}
JSONL = ["task.name=jsonl", "task.path=unused", "task.tokenizer=unused", "rollout.block_size=4"]

# (overrides, rows, group, L0, L1): a 4-layer model with a 32k vocabulary; an 8-layer one with activation
# checkpointing; a wide 2-layer one in bf16 compute with a 64k vocabulary
SHAPES = {
    "d256-L4-V32k": (["model.hidden_size=256", "model.num_layers=4", "model.vocab_size=32768",
                      "model.num_heads=8", "model.num_kv_heads=2"], 24, 3, 64, 128),
    "d384-L8-V8k-checkpointed": (["model.hidden_size=384", "model.num_layers=8", "model.vocab_size=8192",
                                  "model.num_heads=6", "model.num_kv_heads=2",
                                  "model.gradient_checkpointing=true"], 48, 3, 64, 96),
    "d512-L2-V64k-bf16": (["model.hidden_size=512", "model.num_layers=2", "model.vocab_size=65536",
                           "model.num_heads=8", "model.num_kv_heads=2", "model.dtype=bfloat16"], 12, 3, 64, 128),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_plan_predicts_the_measured_training_peak(name):
    from slim_rl.config import load_config
    from slim_rl.memory import measure_train
    from slim_rl.plan import model_shape, predict_train, setting_of

    ov, rows, group, L0, L1 = SHAPES[name]
    overrides = JSONL + ov + [f"optim.micro_batch_rows={rows}", f"rollout.max_new_tokens={L1}"]
    cfg = load_config(None, overrides)
    pred = predict_train(model_shape(cfg), setting_of(cfg, gpus=1, device="cpu", prompt_len=L0))
    got = measure_train(overrides, rows=rows, group=group, prompt_len=L0, response_len=L1)
    ratio = pred["peak"] / got["peak_bytes"]
    print(f"{name}: measured {got['peak_bytes'] / 2**20:.0f} MiB, predicted {pred['peak'] / 2**20:.0f} MiB "
          f"({ratio:.2f}x)")
    assert got["peak_bytes"] > 100 * 2**20  # large enough that the prediction is about the tensors
    assert 0.8 <= ratio <= 1.2, (name, ratio, got, pred)


def test_checkpointing_lowers_the_measured_peak():
    """Activation checkpointing: same loss, and the measured peak of a training micro-batch drops."""
    from slim_rl.memory import measure_train

    ov, rows, group, L0, L1 = SHAPES["d384-L8-V8k-checkpointed"]
    plain = [o for o in ov if "checkpointing" not in o]
    a = measure_train(JSONL + plain, rows=rows, group=group, prompt_len=L0, response_len=L1)
    b = measure_train(JSONL + ov, rows=rows, group=group, prompt_len=L0, response_len=L1)
    print(f"peak of a training micro-batch: {a['peak_bytes'] / 2**20:.0f} MiB without, "
          f"{b['peak_bytes'] / 2**20:.0f} MiB with activation checkpointing")
    assert b["loss"] == a["loss"]
    assert b["peak_bytes"] < 0.5 * a["peak_bytes"]


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "slim_rl", "plan", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)


def test_plan_prints_the_table_for_sdar4b(tmp_path):
    """The published SDAR-4B config.json (its shape: Qwen3, 36 layers, d 2560, 32/8 heads of 128, MLP 9728,
    V 151936, tied embeddings) with configs/sdar4b.yaml, on 8 x 80 GB and on 1 x H200."""
    mdir = tmp_path / "SDAR-4B-Chat"
    mdir.mkdir()
    (mdir / "config.json").write_text(json.dumps({
        "model_type": "sdar", "architectures": ["SDARForCausalLM"], "vocab_size": 151936, "hidden_size": 2560,
        "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "tie_word_embeddings": True}))
    r = _plan("--config", "configs/sdar4b.yaml", f"model.path={mdir}", "--gpus", "8", "--gpu-mem", "80")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "sdar (Qwen3) 4.02B parameters" in out and "8 x 80 GB cuda, fsdp" in out
    assert "training" in out and "rollout" in out and "bottleneck:" in out and " fits" in out
    r1 = _plan("--config", "configs/sdar4b.yaml", f"model.path={mdir}", "--gpus", "1", "--gpu-mem", "141",
               "--json")
    assert r1.returncode == 0, r1.stderr[-3000:]
    p = json.loads(r1.stdout)
    assert p["setting"]["strategy"] == "single" and p["train"]["peak"] > 0
    if not p["fits"]:
        assert p["suggestions"] and p["suggestions"][0]["overrides"]
    # a user error is one line
    bad = _plan("--config", "configs/sdar4b.yaml", "model.path=/nonexistent")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# The published configurations' shapes (config.json fields as released; no weights needed)
PUBLISHED = {
    "SDAR-8B-Chat": ("sdar", 8.19e9, {"model_type": "sdar", "vocab_size": 151936, "hidden_size": 4096,
                                      "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                                      "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
                                      "rope_theta": 1000000, "tie_word_embeddings": False}),
    "LLaDA-8B-Instruct": ("llada", 8.02e9, {"model_type": "llada", "d_model": 4096, "n_heads": 32,
                                             "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288,
                                             "vocab_size": 126464, "embedding_size": 126464, "block_type": "llama",
                                             "activation_type": "silu", "rope": True, "rope_theta": 500000.0,
                                             "max_sequence_length": 4096, "weight_tying": False,
                                             "layer_norm_type": "rms", "rms_norm_eps": 1e-5}),
    "Dream-v0-Instruct-7B": ("dream", 7.62e9, {"model_type": "Dream", "vocab_size": 152064, "hidden_size": 3584,
                                                "intermediate_size": 18944, "num_hidden_layers": 28,
                                                "num_attention_heads": 28, "num_key_value_heads": 4,
                                                "hidden_act": "silu", "rope_theta": 1000000.0,
                                                "tie_word_embeddings": False}),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_plan_reads_published_configs(tmp_path, name):
    family, params, raw = PUBLISHED[name]
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    r = _plan("--config", "configs/sdar4b.yaml", f"model.family={family}", f"model.path={d}", "--gpus", "8",
              "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(r.stdout)
    assert p["model"].startswith(f"{family} (")
    assert float(p["model"].split(") ")[1].split("B")[0]) == pytest.approx(params / 1e9, abs=0.02)
    assert p["rollout"]["kv_cache"] > 0 if family == "sdar" else p["rollout"]["kv_cache"] == 0
