"""slim_rl.models: tiny random models of each family and the offline loader."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from slim_rl.models import FAMILIES, CheckpointError, load, model_info, tiny


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
    with pytest.raises(CheckpointError, match=r"lacks \['d_model'"):
        load(tmp_path, "llada")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="not a sdar checkpoint"):
        load(tmp_path, "sdar")


# ---------------------------------------------------------------------------------------------------------------
# published layouts: tiny checkpoints with the released config fields and parameter names, random fp32 weights,
# checked against a forward written here from each architecture's equations (reading the published names)
# ---------------------------------------------------------------------------------------------------------------

D, H, KV, HD, FF, NL = 64, 4, 2, 16, 96, 2


def _published(family: str, *, sequential: bool = False, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1.0 + w(n)

    sd: dict[str, torch.Tensor] = {}
    if family in ("sdar", "dream"):
        hd = 32 if family == "sdar" else D // H  # SDAR states head_dim (here != hidden / heads)
        cfg = {"architectures": ["SDARForCausalLM" if family == "sdar" else "DreamModel"],
               "model_type": "sdar" if family == "sdar" else "Dream",
               "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"},
               "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": NL, "num_attention_heads": H,
               "num_key_value_heads": KV, "rms_norm_eps": 1e-6, "vocab_size": 50, "tie_word_embeddings": False,
               "hidden_act": "silu", "max_position_embeddings": 512, "use_sliding_window": False,
               "sliding_window": None, "rope_scaling": None, "torch_dtype": "float32", "use_cache": False,
               "mask_token_id": 49, "eos_token_id": 47, "bos_token_id": 47, "attention_dropout": 0.0}
        if family == "sdar":
            cfg.update(head_dim=hd, attention_bias=False, rope_theta=1000000, block_size=4, fuse_cross_entropy=True)
        else:
            cfg.update(rope_theta=10000.0, pad_token_id=48, max_window_layers=28)
        sd["model.embed_tokens.weight"] = w(50, D, std=1.0)
        for i in range(NL):
            p = f"model.layers.{i}."
            sd[p + "input_layernorm.weight"] = norm(D)
            sd[p + "post_attention_layernorm.weight"] = norm(D)
            sd[p + "self_attn.q_proj.weight"] = w(H * hd, D)
            sd[p + "self_attn.k_proj.weight"] = w(KV * hd, D)
            sd[p + "self_attn.v_proj.weight"] = w(KV * hd, D)
            sd[p + "self_attn.o_proj.weight"] = w(D, H * hd)
            if family == "sdar":
                sd[p + "self_attn.q_norm.weight"] = norm(hd)
                sd[p + "self_attn.k_norm.weight"] = norm(hd)
            else:
                for n, rows in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
                    sd[p + f"self_attn.{n}_proj.bias"] = w(rows)
            sd[p + "mlp.gate_proj.weight"] = w(FF, D)
            sd[p + "mlp.up_proj.weight"] = w(FF, D)
            sd[p + "mlp.down_proj.weight"] = w(D, FF)
        sd["model.norm.weight"] = norm(D)
        sd["lm_head.weight"] = w(50, D)
        return cfg, sd
    # LLaDA (LLaDAModelLM): OLMo-style config and names; embedding_size > vocab_size as released
    cfg = {"architectures": ["LLaDAModelLM"], "model_type": "llada",
           "auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"},
           "activation_type": "swiglu" if sequential else "silu", "alibi": False, "alibi_bias_max": 8.0,
           "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
           "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "sequential" if sequential else "llama",
           "d_model": D, "embedding_dropout": 0.0, "embedding_size": 56, "eos_token_id": 47, "flash_attention": False,
           "include_bias": False, "include_qkv_bias": False, "init_device": "meta", "init_fn": "mitchell",
           "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
           "mask_token_id": 49, "max_sequence_length": 512, "mlp_hidden_size": 2 * FF if sequential else FF,
           "mlp_ratio": 4, "model_type_": None, "multi_query_attention": None, "n_heads": H, "n_kv_heads": KV,
           "n_layers": NL, "pad_token_id": 48, "precision": "amp_bf16", "residual_dropout": 0.0,
           "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
           "scale_logits": False, "vocab_size": 50, "weight_tying": False, "use_cache": False}
    del cfg["model_type_"]
    sd["model.transformer.wte.weight"] = w(56, D, std=1.0)
    for i in range(NL):
        p = f"model.transformer.blocks.{i}."
        sd[p + "attn_norm.weight"] = norm(D)
        sd[p + "ff_norm.weight"] = norm(D)
        if sequential:
            sd[p + "att_proj.weight"] = w(D + 2 * KV * HD, D)
            sd[p + "ff_proj.weight"] = w(2 * FF, D)
        else:
            sd[p + "q_proj.weight"] = w(D, D)
            sd[p + "k_proj.weight"] = w(KV * HD, D)
            sd[p + "v_proj.weight"] = w(KV * HD, D)
            sd[p + "ff_proj.weight"] = w(FF, D)
            sd[p + "up_proj.weight"] = w(FF, D)
        sd[p + "attn_out.weight"] = w(D, D)
        sd[p + "ff_out.weight"] = w(D, FF)
    sd["model.transformer.ln_f.weight"] = norm(D)
    sd["model.transformer.ff_out.weight"] = w(56, D)
    return cfg, sd


def _write(path, cfg, sd, shards: int = 1):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if shards == 1:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(sd)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s::shards]}
        save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())}, "weight_map": weight_map}, f)


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    """Rotary embedding on the two halves of each head: (x1, x2) -> (x1 cos − x2 sin, x2 cos + x1 sin)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = (pos.double()[..., None] * inv)[:, None]  # [B, 1, L, d/2]
    cos, sin = ang.cos().float(), ang.sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attend(q, k, v, allowed):
    """softmax(q kᵀ / √d + mask) v, each query head h reading KV head h // (H / KV)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _equations(family, cfg, sd, ids, pos, allowed, *, sequential=False):
    """Logits from the architecture's equations, reading the published parameter names."""
    B, L = ids.shape
    silu = torch.nn.functional.silu
    if family in ("sdar", "dream"):
        hd = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        eps, theta = cfg["rms_norm_eps"], float(cfg["rope_theta"])
        x = sd["model.embed_tokens.weight"][ids]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = _rms(x, sd[p + "input_layernorm.weight"], eps)
            proj = {}
            for n, heads in (("q", H), ("k", KV), ("v", KV)):
                t = h @ sd[p + f"self_attn.{n}_proj.weight"].T
                if family == "dream":
                    t = t + sd[p + f"self_attn.{n}_proj.bias"]
                proj[n] = t.view(B, L, heads, hd).transpose(1, 2)
            q, k = proj["q"], proj["k"]
            if family == "sdar":  # RMS norm of every query / key head before RoPE
                q = _rms(q, sd[p + "self_attn.q_norm.weight"], eps)
                k = _rms(k, sd[p + "self_attn.k_norm.weight"], eps)
            q, k = _rope(q, pos, theta), _rope(k, pos, theta)
            o = _attend(q, k, proj["v"], allowed).transpose(1, 2).reshape(B, L, H * hd)
            x = x + o @ sd[p + "self_attn.o_proj.weight"].T
            h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
            mlp = silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
            x = x + mlp @ sd[p + "mlp.down_proj.weight"].T
        return _rms(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T
    eps, theta, hd = cfg["rms_norm_eps"], cfg["rope_theta"], cfg["d_model"] // cfg["n_heads"]
    x = sd["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = _rms(x, sd[p + "attn_norm.weight"], eps)
        if sequential:  # fused q|k|v projection
            q, k, v = (h @ sd[p + "att_proj.weight"].T).split([D, KV * hd, KV * hd], dim=-1)
        else:
            q, k, v = (h @ sd[p + f"{n}_proj.weight"].T for n in "qkv")
        q = q.view(B, L, H, hd).transpose(1, 2)
        k = k.view(B, L, KV, hd).transpose(1, 2)
        v = v.view(B, L, KV, hd).transpose(1, 2)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        o = _attend(q, k, v, allowed).transpose(1, 2).reshape(B, L, D)
        x = x + o @ sd[p + "attn_out.weight"].T
        h = _rms(x, sd[p + "ff_norm.weight"], eps)
        if sequential:  # SwiGLU on the halves of ff_proj: (a, gate) -> silu(gate) · a
            a, gate = (h @ sd[p + "ff_proj.weight"].T).chunk(2, dim=-1)
            f = silu(gate) * a
        else:
            f = silu(h @ sd[p + "ff_proj.weight"].T) * (h @ sd[p + "up_proj.weight"].T)
        x = x + f @ sd[p + "ff_out.weight"].T
    return _rms(x, sd["model.transformer.ln_f.weight"], eps) @ sd["model.transformer.ff_out.weight"].T


def _check_logits(model, family, cfg, sd, *, sequential=False):
    g = torch.Generator().manual_seed(7)
    B, L = 2, 12
    ids = torch.randint(0, 47, (B, L), generator=g)
    pos = torch.arange(L).repeat(B, 1)
    if family == "sdar":  # block-causal staircase, K = 4
        blk = torch.arange(L) // 4
        allowed = (blk[None, :] <= blk[:, None]).expand(B, L, L)
    else:  # bidirectional
        allowed = torch.ones(B, L, L, dtype=torch.bool)
    mask = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], float("-inf"))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        want = _equations(family, cfg, sd, ids, pos, allowed, sequential=sequential)
    assert got.shape == want.shape and got.dtype == torch.float32
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, f"{family}: max relative logit error {rel:.3g} > 1e-5"


@pytest.mark.parametrize("family", FAMILIES)
def test_published_layout_loads_and_matches_equations(tmp_path, family):
    cfg, sd = _published(family)
    _write(tmp_path, cfg, sd)
    m = load(tmp_path, family)
    vocab = 56 if family == "llada" else 50
    assert m.get_output_embeddings().weight.shape == (vocab, D)
    assert (m.mask_id, m.eos_id, m.family, m.shift) == (49, 47, family, 1 if family == "dream" else 0)
    assert next(m.parameters()).dtype == torch.float32
    _check_logits(m, family, cfg, sd)


def test_llada_sequential_block_layout(tmp_path):
    """Fused att_proj and SwiGLU ff_proj (OLMo sequential blocks) are split into q/k/v and up/gate."""
    cfg, sd = _published("llada", sequential=True, seed=3)
    _write(tmp_path, cfg, sd)
    _check_logits(load(tmp_path, "llada"), "llada", cfg, sd, sequential=True)


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_sharded_checkpoint_loads(tmp_path, family):
    cfg, sd = _published(family, seed=1)
    _write(tmp_path, cfg, sd, shards=2)
    assert not (tmp_path / "model.safetensors").exists()
    _check_logits(load(tmp_path, family), family, cfg, sd)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load(tmp_path, family)


def test_unmappable_checkpoint_lists_every_key(tmp_path):
    cfg, sd = _published("llada", seed=2)
    sd["model.transformer.blocks.0.mystery.weight"] = torch.zeros(3)
    del sd["model.transformer.blocks.1.up_proj.weight"]
    sd["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(D + 1, D)
    _write(tmp_path, cfg, sd)
    with pytest.raises(CheckpointError) as e:
        load(tmp_path, "llada")
    msg = str(e.value)
    assert "mystery.weight" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight (65, 64) != (64, 64)" in msg
    bad = dict(cfg, alibi=True, scale_logits=True)
    _write(tmp_path, bad, _published("llada")[1])
    with pytest.raises(CheckpointError, match=r"alibi \(not mapped\); scale_logits"):
        load(tmp_path, "llada")
    cfg, sd = _published("sdar")
    _write(tmp_path / "s", dict(cfg, use_sliding_window=True, rope_scaling={"rope_type": "yarn"}), sd)
    with pytest.raises(CheckpointError, match="use_sliding_window=true.*yarn"):
        load(tmp_path / "s", "sdar")


def _char_tokenizer(path, vocab_chars):
    """A tiny local tokenizer folder (word-level over characters) as a user would have on disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(vocab_chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="?", eos_token="<eos>")
    fast.save_pretrained(path)
    return fast


def test_load_with_local_tokenizer_folder(tmp_path):
    cfg, sd = _published("dream")
    _write(tmp_path / "ckpt", cfg, sd)
    _char_tokenizer(tmp_path / "tok", list("0123456789+=?") + ["<eos>"])
    m = load(tmp_path / "ckpt", "dream", tokenizer=tmp_path / "tok")
    assert m.tokenizer("12+3")["input_ids"] == [1, 2, 10, 3]
    _char_tokenizer(tmp_path / "big", [chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(26)])
    with pytest.raises(CheckpointError, match="has 54 tokens but the model's vocabulary is 50"):
        load(tmp_path / "ckpt", "dream", tokenizer=tmp_path / "big")


# ---------------------------------------------------------------------------------------------------------------
# the JSONL math task (configs/math_sample.jsonl) end to end: tokenizer folder + checkpoint folder -> RL steps
# ---------------------------------------------------------------------------------------------------------------

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                      "math_sample.jsonl")
RL_TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
           "sft.steps=0", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.block_size=4",
           "rollout.steps_per_block=4", "rollout.max_new_tokens=8", "rollout.truncation_margin=1",
           "task.num_eval=4", "eval.every=0", "train.tensorboard=false", "train.threads=1",
           "train.progress=false", "advantage.filter_groups=false", "optim.micro_batch_rows=4", "train.steps=2",
           "task.name=jsonl", f"task.path={SAMPLE}", "task.reward=math"]


def test_jsonl_math_task_runs_rl_steps(tmp_path):
    from slim_rl.config import ConfigError, check_files, load_config
    from slim_rl.trainer import Trainer

    with open(SAMPLE) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) >= 32 and all(set(r) == {"prompt", "answer"} for r in rows)
    chars = sorted(set("".join(r["prompt"] for r in rows)) | set("0123456789\\{}"))
    tok = tmp_path / "tok"
    _char_tokenizer(tok, ["?", "<eos>"] + [c for c in chars if c != "?"])
    ckpt = tmp_path / "ckpt"
    V = len(chars) + 8
    tiny("sdar", vocab_size=V, seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1).save_pretrained(ckpt)
    cfg = check_files(load_config(None, RL_TINY + [f"task.tokenizer={tok}", f"model.path={ckpt}",
                                                   f"train.out_dir={tmp_path / 'run'}"]))
    tr = Trainer(cfg)
    assert tr.model.get_output_embeddings().weight.shape[0] == V
    tr.train()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in recs if "reward" in r]
    assert len(steps) == 2 and all(math.isfinite(r["reward"]) for r in steps)
    # a checkpoint whose vocabulary is smaller than the tokenizer's fails before any model is built
    small = tmp_path / "small"
    tiny("sdar", vocab_size=16, seed=0, hidden_size=32, num_layers=1, num_heads=2,
         num_kv_heads=1).save_pretrained(small)
    with pytest.raises(ConfigError, match="tokens but the model's vocabulary is 16"):
        check_files(load_config(None, RL_TINY + [f"task.tokenizer={tok}", f"model.path={small}",
                                                 f"train.out_dir={tmp_path / 'run2'}"]))


def test_sdar4b_config_runs_on_a_published_layout_checkpoint(tmp_path):
    """configs/sdar4b.yaml itself (FSDP, slim attention, bf16, JSONL math task) with only the sizes shrunk:
    a tiny checkpoint in SDAR's published layout, the sample JSONL file, a local tokenizer folder."""
    from slim_rl.config import check_files, load_config
    from slim_rl.trainer import Trainer

    root = os.path.dirname(SAMPLE)
    with open(SAMPLE) as f:
        chars = sorted(set("".join(json.loads(line)["prompt"] for line in f)) | set("0123456789\\{}"))
    _char_tokenizer(tmp_path / "tok", ["?", "<eos>"] + [c for c in chars if c != "?"])
    cfg_json, sd = _published("sdar")
    V = len(chars) + 8
    cfg_json.update(vocab_size=V, mask_token_id=V - 1, eos_token_id=V - 2)
    g = torch.Generator().manual_seed(4)
    sd["model.embed_tokens.weight"] = torch.randn(V, D, generator=g)
    sd["lm_head.weight"] = torch.randn(V, D, generator=g) * 0.1
    _write(tmp_path / "ckpt", cfg_json, sd)
    over = [f"model.path={tmp_path / 'ckpt'}", f"task.path={SAMPLE}", f"task.tokenizer={tmp_path / 'tok'}",
            "task.num_eval=4", "rollout.block_size=4", "rollout.steps_per_block=4", "rollout.max_new_tokens=8",
            "rollout.truncation_margin=1", "rollout.group_size=2", "rollout.prompts_per_step=2",
            "rollout.batch_size=4", "optim.micro_batch_rows=4", "train.steps=1", "eval.every=0",
            "train.tensorboard=false", "train.threads=1", "train.progress=false", "advantage.filter_groups=false",
            f"train.out_dir={tmp_path / 'run'}"]
    cfg = check_files(load_config(os.path.join(root, "sdar4b.yaml"), over))
    assert (cfg.model.family, cfg.model.attention, cfg.dist.strategy) == ("sdar", "slim", "fsdp")
    tr = Trainer(cfg)
    # the paper's numerics: fp32 master weights, bf16 compute (forwards, rollouts)
    assert next(tr.model.parameters()).dtype == torch.float32 and tr.compute_dtype == torch.bfloat16
    with tr.decode_model() as m:
        assert next(m.parameters()).dtype == torch.bfloat16
    tr.train()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert sum("reward" in json.loads(line) for line in f if line.strip()) == 1
