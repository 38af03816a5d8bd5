"""The transformers integration: a tiny random Qwen3 run through ``slim_block_diffusion`` attention gives
the logits (and gradients) of the same model run with SDPA and the dense 4-D mask."""

from __future__ import annotations

import pytest
import torch

from slim_ops._backend import available_backends
from slim_ops.layout import BlockLayout
from slim_ops.testing import assert_close

transformers = pytest.importorskip("transformers")
from slim_ops.integrations import hf  # noqa: E402

HAS_TRITON = "triton" in available_backends("cpu", "block_diffusion_attention", ("torch", "triton"))
TOL = {"atol": 2e-4, "rtol": 2e-4}


def _tiny_qwen3(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    return transformers.Qwen3ForCausalLM(cfg).eval()


def _batch(L0=5, L1=8, K=4, B=2, pad_id=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, L0 + 2 * L1), generator=g)
    n_pad = torch.tensor([2, 0][:B])
    pad = torch.arange(L0)[None, :] < n_pad[:, None]
    ids[:, :L0][pad] = pad_id
    ids[:, L0 + L1 :][torch.rand(B, L1, generator=g) < 0.5] = 96  # "mask" tokens on the noisy copy
    return ids, BlockLayout.train(L0, L1, K, prompt_pad=pad)


def _sdpa_dense_logits(model, ids, lay):
    model.set_attn_implementation("sdpa")
    try:
        return model(
            input_ids=ids, attention_mask=lay.dense_mask()[:, None], position_ids=lay.position_ids()
        ).logits
    finally:
        model.set_attn_implementation(hf.register())


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
def test_qwen3_logits_equal_sdpa_dense(backend):
    model = _tiny_qwen3()
    ids, lay = _batch()
    exp = _sdpa_dense_logits(model, ids, lay)
    model.set_attn_implementation(hf.register())
    got = model(
        input_ids=ids, position_ids=lay.position_ids(), block_layout=lay, block_backend=backend
    ).logits
    assert got.shape == (2, lay.seq_len, 97)
    assert_close(got, exp, name=f"logits[{backend}]", **TOL)
    # the layout changes the result (the test can fail): a plain staircase gives other logits
    other = model(
        input_ids=ids,
        position_ids=lay.position_ids(),
        block_layout=BlockLayout.staircase(lay.seq_len, 4),
        block_backend=backend,
    ).logits
    assert (other - exp).abs().max() > 1e-3


def test_context_manager_and_dense_mask_path_and_grads():
    model = _tiny_qwen3(3)
    ids, lay = _batch(L0=4, L1=6, K=3, seed=4)
    exp = _sdpa_dense_logits(model, ids, lay)
    model.set_attn_implementation(hf.register())
    with hf.block_layout(lay):
        got = model(input_ids=ids, position_ids=lay.position_ids()).logits
    assert_close(got, exp, name="logits (context manager)", **TOL)
    dense = model(
        input_ids=ids, attention_mask=lay.dense_mask()[:, None], position_ids=lay.position_ids()
    ).logits
    assert_close(dense, exp, name="logits (precomputed 4-D mask)", **TOL)

    # gradients of a loss through the integration equal those through SDPA + dense mask
    w = torch.randn(exp.shape, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    (model(input_ids=ids, position_ids=lay.position_ids(), block_layout=lay).logits * w).sum().backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation("sdpa")
    (
        model(input_ids=ids, attention_mask=lay.dense_mask()[:, None], position_ids=lay.position_ids()).logits
        * w
    ).sum().backward()
    for n, p in model.named_parameters():
        assert_close(g_ours[n], p.grad, name=f"grad {n}", atol=1e-4, rtol=1e-3)


def test_decode_step_with_kv_cache():
    """Prefill a staircase, then one decode step of K slots over the cache: equals the full staircase run."""
    model = _tiny_qwen3(5)
    K, L = 4, 12
    ids = torch.randint(1, 97, (1, L + K), generator=torch.Generator().manual_seed(2))
    model.set_attn_implementation(hf.register())
    full = model(input_ids=ids, block_layout=BlockLayout.staircase(L + K, K)).logits
    cache = transformers.DynamicCache(config=model.config)
    model(
        input_ids=ids[:, :L], block_layout=BlockLayout.staircase(L, K), past_key_values=cache, use_cache=True
    )
    step = model(
        input_ids=ids[:, L:],
        block_layout=BlockLayout.decode(L, K),
        past_key_values=cache,
        position_ids=torch.arange(L, L + K)[None],
        use_cache=True,
    ).logits
    assert_close(step, full[:, L:], name="decode-step logits", **TOL)


def test_missing_layout_is_an_actionable_error():
    model = _tiny_qwen3()
    model.set_attn_implementation(hf.register())
    with pytest.raises(ValueError, match="block_layout=BlockLayout"):
        model(input_ids=torch.randint(1, 97, (1, 6)))
