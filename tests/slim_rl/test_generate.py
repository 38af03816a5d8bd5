"""slim_rl.generate: the batched block-diffusion engine on tiny random models (issue 5 acceptance 1-4)."""

from __future__ import annotations

import pytest
import torch

from slim_rl.generate import generate
from slim_rl.models import FAMILIES, tiny

V = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded (and do not spin-wait on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17, 18, 19, 1, 2, 3, 20]]


def _model(family: str, seed: int = 0, head_std: float = 0.5):
    return tiny(family, vocab_size=V, seed=seed, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                head_std=head_std)


def _with_eos(model, block_size: int, max_new_tokens: int):
    """Swap the output rows of EOS and a token the model emits early in some responses, so that EOS
    is generated (the input embeddings are unchanged)."""
    out = generate(model, PROMPTS, block_size=block_size, max_new_tokens=max_new_tokens, tau=0.6)
    tok = int(out.tokens[1, block_size + 1])  # row 1, second block: finishes after one block at least
    assert tok != model.eos_id
    w = model.get_output_embeddings().weight.data
    w[[tok, model.eos_id]] = w[[model.eos_id, tok]]
    return model


def _check_consistent(model, out, prompts, *, block_size, max_new_tokens, steps):
    """Acceptance 1: no mask left, max_new_tokens and EOS respected, step_map / commits / nfe agree."""
    K, S = block_size, steps
    nb = -(-max_new_tokens // K)
    assert len(out.sequences) == len(prompts)
    assert out.tokens.shape == (len(prompts), nb * K) and out.commits.shape == (len(prompts), nb * S)
    for i, seq in enumerate(out.sequences):
        assert seq.dtype == torch.int64 and 1 <= len(seq) <= max_new_tokens
        assert not (seq == model.mask_id).any(), f"row {i}: mask token left in the output"
        eos = (seq == model.eos_id).nonzero()
        if len(eos):  # EOS only as the last token, and the row is marked finished
            assert eos.numel() == 1 and int(eos[0]) == len(seq) - 1
            assert out.finished[i]
        else:
            assert len(seq) == max_new_tokens and not out.finished[i]
        assert torch.equal(out.step_map[i], out.full_step_map[i, : len(seq)])
        assert torch.equal(seq, out.tokens[i, : len(seq)])
        # decoded blocks: a prefix of whole blocks, every slot committed exactly once
        decoded = out.full_step_map[i] >= 0
        n_dec = int(decoded.sum())
        assert n_dec % K == 0 and n_dec >= len(seq) and bool(decoded[:n_dec].all())
        assert not (out.tokens[i, :n_dec] == model.mask_id).any()
        if n_dec < nb * K:  # the row left the batch after its EOS block
            assert out.finished[i] and (out.tokens[i, :n_dec] == model.eos_id).any()
            assert (out.tokens[i, n_dec:] == model.pad_id).all()
        n = int(out.nfe[i])
        assert n_dec // K <= n <= (n_dec // K) * S
        assert torch.equal(torch.bincount(out.full_step_map[i, :n_dec].long(), minlength=n)[:n],
                           out.commits[i, :n].long())
        assert (out.commits[i, :n] >= 1).all() and (out.commits[i, n:] == 0).all()
        assert int(out.commits[i].sum()) == n_dec
        # steps of block b all precede those of block b+1
        sm = out.full_step_map[i, :n_dec].view(-1, K)
        assert (sm.amax(dim=1)[:-1] < sm.amin(dim=1)[1:]).all()
        # ewc = Σ (1 - c) over each step's commits, from the recorded confidences
        c = out.full_confidence[i, :n_dec]
        ewc = torch.zeros(n, dtype=torch.float64).index_add_(0, out.full_step_map[i, :n_dec].long(),
                                                             (1.0 - c).double())
        torch.testing.assert_close(out.ewc[i, :n].double(), ewc, atol=1e-5, rtol=1e-5)
    assert out.num_generated == int((out.full_step_map >= 0).sum())
    assert out.tokens_per_forward == pytest.approx(out.num_generated / int(out.nfe.sum()))
    hist = out.commits_histogram
    assert hist.shape == (K + 1,) and int(hist.sum()) == int(out.nfe.sum())
    assert int((hist * torch.arange(K + 1)).sum()) == out.num_generated


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_terminates_and_is_consistent(family):
    model = _with_eos(_model(family), 4, 12)
    out = generate(model, PROMPTS, block_size=4, max_new_tokens=12, tau=0.6)
    assert out.finished.any(), "the EOS swap should make at least one row stop"
    _check_consistent(model, out, PROMPTS, block_size=4, max_new_tokens=12, steps=4)
    again = generate(model, PROMPTS, block_size=4, max_new_tokens=12, tau=0.6)
    for a, b in zip(out.sequences, again.sequences, strict=True):
        assert torch.equal(a, b), "greedy decoding must be deterministic"
    assert torch.equal(out.full_step_map, again.full_step_map)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_by_one(family):
    """Acceptance 3: ragged left-padded batch == each prompt alone (greedy), rows leaving on EOS."""
    model = _with_eos(_model(family, seed=1), 4, 12)
    batched = generate(model, PROMPTS, block_size=4, max_new_tokens=12, tau=0.6)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], block_size=4, max_new_tokens=12, tau=0.6)
        assert torch.equal(batched.sequences[i], alone.sequences[0]), f"row {i}"
        assert torch.equal(batched.step_map[i], alone.step_map[0]), f"row {i}"
        assert int(batched.nfe[i]) == int(alone.nfe[0])
    if family != "sdar":  # rows advance through their blocks independently: max_r NFE_r forwards
        assert batched.model_calls == int(batched.nfe.max())
    chunked = generate(model, PROMPTS, block_size=4, max_new_tokens=12, tau=0.6, batch_size=3)
    for a, b in zip(batched.sequences, chunked.sequences, strict=True):
        assert torch.equal(a, b)


def test_sdar_cache_equals_no_cache():
    """Acceptance 2: KV cache + save pass == recomputing the whole prefix with the staircase each step."""
    model = _model("sdar", seed=2)
    prompts = PROMPTS + [[3] * 11]
    settings = (dict(block_size=4, max_new_tokens=16, tau=0.6), dict(block_size=3, max_new_tokens=8, tau=0.9))
    for kwargs in settings:
        cached = generate(model, prompts, use_cache=True, **kwargs)
        full = generate(model, prompts, use_cache=False, **kwargs)
        for i in range(len(prompts)):
            assert torch.equal(cached.sequences[i], full.sequences[i]), f"row {i} {kwargs}"
        assert torch.equal(cached.full_step_map, full.full_step_map)
        torch.testing.assert_close(cached.full_confidence, full.full_confidence, atol=1e-5, rtol=1e-5,
                                   equal_nan=True)


def test_risk_within_budget_when_budget_binds():
    """Acceptance 4: with f = 1 (S = K) and m = 1, a step whose commit set is chosen by the budget
    (every committed c > τ) has risk Σ(1 − c) <= 1 − τ; otherwise the floor committed exactly one slot."""
    tau = 0.8
    b = float(torch.tensor(1.0 - tau, dtype=torch.float64).float())
    model = _model("sdar", seed=3, head_std=3.0)
    out = generate(model, PROMPTS, block_size=8, max_new_tokens=24, tau=tau, m=1.0)
    tau32 = torch.tensor(tau, dtype=torch.float32)
    binding = multi = 0
    for i in range(len(PROMPTS)):
        n = int(out.nfe[i])
        for s in range(n):
            sel = out.full_step_map[i] == s
            c = out.full_confidence[i][sel]
            assert int(sel.sum()) == int(out.commits[i, s])
            if bool((c > tau32).all()):
                binding += 1
                multi += int(sel.sum()) > 1
                risk = torch.zeros((), dtype=torch.float32)
                for x in c.sort(descending=True).values:
                    risk = risk + (1.0 - x)
                assert float(risk) <= b, f"row {i} step {s}: risk {float(risk)} > {b}"
            else:
                assert int(sel.sum()) == 1, "the floor (f = 1) commits exactly one slot"
    assert multi > 0, "the test model must produce steps committing several confident slots"


@pytest.mark.parametrize("strategy", ["tau_budget", "threshold", "topk"])
def test_strategies_and_floor(strategy):
    model = _model("sdar", seed=4)
    K, S = 4, 2  # f_j = 2
    out = generate(model, PROMPTS[:2], block_size=K, max_new_tokens=8, steps_per_block=S, strategy=strategy,
                   tau=0.6)
    _check_consistent(model, out, PROMPTS[:2], block_size=K, max_new_tokens=8, steps=S)
    for i in range(2):
        n = int(out.nfe[i])
        assert (out.commits[i, :n] >= 2).all()
        if strategy == "topk":
            assert n == 4 and (out.commits[i, :n] == 2).all()


def test_no_early_exit_runs_all_steps_and_agrees():
    model = _model("sdar", seed=5)
    a = generate(model, PROMPTS, block_size=4, max_new_tokens=8, tau=0.6, early_exit=True)
    b = generate(model, PROMPTS, block_size=4, max_new_tokens=8, tau=0.6, early_exit=False)
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.nfe, b.nfe)  # rows count only steps in which they had masked slots
    assert b.model_calls == 2 * 4 + 1  # nb·S denoising forwards (the first = the prefill) + (nb − 1) saves
    assert a.model_calls <= b.model_calls


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_sampling_reproducible(family):
    model = _model(family, seed=6)
    kw = dict(block_size=4, max_new_tokens=8, temperature=1.0, top_k=10, top_p=0.95)
    a = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert torch.equal(x, y)
        assert not (x == model.mask_id).any()
    _check_consistent(model, a, PROMPTS, block_size=4, max_new_tokens=8, steps=4)


def test_max_new_tokens_not_a_block_multiple_and_tensor_prompts():
    model = _model("dream", seed=7)
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompts, block_size=4, max_new_tokens=6)
    assert out.tokens.shape == (2, 8)
    for seq in out.sequences:
        assert len(seq) <= 6
    _check_consistent(model, out, list(prompts), block_size=4, max_new_tokens=6, steps=4)
    m = out.metrics()
    assert m["generated_tokens"] == out.num_generated and m["nfe_total"] == int(out.nfe.sum())


def test_validation_messages():
    model = _model("sdar")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        generate(model, PROMPTS, block_size=0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        generate(model, PROMPTS, strategy="greedy")
    with pytest.raises(ValueError, match="tau must be a float in"):
        generate(model, PROMPTS, tau=1.0)
    with pytest.raises(ValueError, match="contains the mask token"):
        generate(model, [[1, model.mask_id]])
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, V]])
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[]])
    with pytest.raises(ValueError, match="batch_size must be"):
        generate(model, PROMPTS, batch_size=0)
    with pytest.raises(TypeError, match="lacks attribute"):
        generate(torch.nn.Linear(2, 2), PROMPTS)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_batched_equals_alone_real_vocab(family):
    """On the device (lagged early-exit flag, pinned copies): real vocabulary size, K = 16, ragged batch;
    batched == alone, SDAR cache == no cache, and the acceptance-1 invariants."""
    vocab = {"sdar": 151936, "llada": 126464, "dream": 152064}[family]
    model = tiny(family, vocab_size=vocab, seed=9, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_std=0.3, device="cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab - 3, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (12,), generator=g)]
    kw = dict(block_size=16, max_new_tokens=48, tau=0.9)
    out = generate(model, prompts, **kw)
    _check_consistent(model, out, prompts, block_size=16, max_new_tokens=48, steps=16)
    for i in (0, 5, 11):
        alone = generate(model, [prompts[i]], **kw)
        assert torch.equal(out.sequences[i], alone.sequences[0]), f"row {i}"
    if family == "sdar":
        full = generate(model, prompts, use_cache=False, **kw)
        for i in range(len(prompts)):
            assert torch.equal(out.sequences[i], full.sequences[i]), f"row {i}"


@pytest.mark.parametrize("family", ["sdar", "dream"])
def test_slim_attention_layouts_equal_dense_masks(family):
    """With slim_ops attention the SDAR forwards get BlockLayouts (no mask tensor); same greedy output
    as the dense-mask path, with and without the KV cache. LLaDA / Dream keep their dense canvas mask."""
    from slim_ops.integrations import hf

    dense_model = _model(family, seed=10)
    slim_model = _model(family, seed=10)
    slim_model.set_attn_implementation(hf.register())
    kw = dict(block_size=4, max_new_tokens=8, tau=0.6)
    ref = generate(dense_model, PROMPTS, **kw)
    for use_cache in (True, False) if family == "sdar" else (True,):
        mode = "layout" if family == "sdar" else "auto"
        out = generate(slim_model, PROMPTS, use_cache=use_cache, attention=mode, **kw)
        for i in range(len(PROMPTS)):
            assert torch.equal(out.sequences[i], ref.sequences[i]), f"row {i} use_cache={use_cache}"
    with pytest.raises(ValueError, match="set_attn_implementation"):
        generate(dense_model, PROMPTS, attention="layout", **kw)


def test_module_is_callable():
    import slim_rl
    import slim_rl.generate  # noqa: F401

    model = _model("sdar", seed=11)
    a = slim_rl.generate(model, PROMPTS[:2], block_size=4, max_new_tokens=4)
    b = generate(model, PROMPTS[:2], block_size=4, max_new_tokens=4)
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_past_max_new_tokens_is_not_finished(family):
    """EOS decoded in the last block but after max_new_tokens: the response is cut, not finished."""
    found = None
    for seed in range(12, 20):  # deterministic search: a prompt whose response emits EOS at slot 6 or 7 only
        base = generate(_model(family, seed=seed), PROMPTS, block_size=4, max_new_tokens=6).tokens
        for r, slot in ((r, slot) for r in range(len(PROMPTS)) for slot in (6, 7)):
            tok = int(base[r, slot])
            if bool((base[r, :6] == tok).any()):
                continue
            model = _model(family, seed=seed)
            w = model.get_output_embeddings().weight.data
            w[[tok, model.eos_id]] = w[[model.eos_id, tok]]
            out = generate(model, [PROMPTS[r]], block_size=4, max_new_tokens=6)
            eos = out.tokens[0] == model.eos_id
            if bool(eos[6:].any()) and not bool(eos[:6].any()):
                found = (model, out, r)
                break
        if found:
            break
    assert found is not None, "no test model emits EOS only past max_new_tokens"
    model, out, r = found
    assert len(out.sequences[0]) == 6 and not out.finished[0]
    _check_consistent(model, out, [PROMPTS[r]], block_size=4, max_new_tokens=6, steps=4)


# ---------------------------------------------------------------------------------------------------------------
# the peers' options: selection rules, suppressed / deferred ids, classifier-free guidance, prefix / dual caches
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["entropy_bounded", "factor", "random"])
@pytest.mark.parametrize("family", ["sdar", "dream"])
def test_peer_strategies_terminate_and_are_consistent(strategy, family):
    model = _with_eos(_model(family, seed=9, head_std=2.0), 4, 12)
    kw = dict(block_size=4, max_new_tokens=12, strategy=strategy, gamma=0.5, factor=1.0)
    out = generate(model, PROMPTS, generator=torch.Generator().manual_seed(1), **kw)
    _check_consistent(model, out, PROMPTS, block_size=4, max_new_tokens=12, steps=4)
    again = generate(model, PROMPTS, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out.tokens, again.tokens) and torch.equal(out.full_step_map, again.full_step_map)
    if strategy == "random":
        assert (out.commits[out.commits > 0] == 1).all()  # f = 1 slot per step, drawn at random
        other = generate(model, PROMPTS, generator=torch.Generator().manual_seed(2), **kw)
        assert not torch.equal(other.full_step_map, out.full_step_map)


def test_entropy_bounded_and_factor_extremes():
    model = _model("llada", seed=9, head_std=2.0)
    kw = dict(block_size=4, max_new_tokens=8)
    wide = generate(model, PROMPTS, strategy="entropy_bounded", gamma=1e6, **kw)
    assert (wide.nfe == 2).all()  # Σ H − max H <= γ for the whole block: one step per block
    narrow = generate(model, PROMPTS, strategy="entropy_bounded", gamma=0.0, **kw)
    assert (narrow.commits[:, :8] == 1).all()  # γ = 0: exactly one slot per step
    assert (generate(model, PROMPTS, strategy="factor", factor=1e-6, **kw).commits[:, :8] == 1).all()
    assert (generate(model, PROMPTS, strategy="factor", factor=1e6, **kw).nfe == 2).all()


def test_suppress_and_defer_ids():
    model = _model("llada", seed=10, head_std=2.0)
    kw = dict(block_size=4, max_new_tokens=12, tau=0.6)
    base = generate(model, PROMPTS, **kw)
    common = torch.bincount(base.tokens.flatten(), minlength=V).topk(2).indices.tolist()
    out = generate(model, PROMPTS, suppress_ids=common, **kw)
    assert not torch.isin(out.tokens, torch.tensor(common)).any()
    _check_consistent(model, out, PROMPTS, block_size=4, max_new_tokens=12, steps=4)
    deferred = generate(model, PROMPTS, defer_ids=common, **kw)
    _check_consistent(model, deferred, PROMPTS, block_size=4, max_new_tokens=12, steps=4)
    hit = torch.isin(deferred.tokens, torch.tensor(common))
    assert hit.any()
    assert (deferred.full_confidence[hit] == 0).all()  # the confidence the selection used
    for i in range(len(PROMPTS)):  # c = 0 is never above τ: only the floor (f = 1) takes a deferred slot, and
        for t in deferred.full_step_map[i][hit[i]].tolist():  # only when no other masked slot is left to take
            assert int(deferred.commits[i, t]) == 1


def test_cfg_scale_combines_conditional_and_unconditional_logits(monkeypatch):
    import slim_rl.generate as G

    model = _model("llada", seed=11, head_std=2.0)
    seen = []
    orig = G._step
    monkeypatch.setattr(G, "_step", lambda logits, *a: (seen.append(logits.clone()), orig(logits, *a))[1])
    s = 1.5
    generate(model, [PROMPTS[0]], block_size=4, max_new_tokens=4, cfg_scale=s)
    L0 = len(PROMPTS[0])
    x = torch.tensor([PROMPTS[0] + [model.mask_id] * 4])
    un = x.clone()
    un[:, :L0] = model.mask_id
    pos = torch.arange(L0 + 4)[None]
    full = torch.zeros(1, 1, L0 + 4, L0 + 4)  # bidirectional, nothing hidden
    with torch.no_grad():
        c = model(input_ids=x, position_ids=pos, attention_mask=full).logits[:, L0:]
        u = model(input_ids=un, position_ids=pos, attention_mask=full).logits[:, L0:]
    want = u + (s + 1) * (c - u)
    torch.testing.assert_close(seen[0], want, atol=1e-4, rtol=1e-4)
    a = generate(model, PROMPTS, block_size=4, max_new_tokens=8, cfg_scale=0.0)
    b = generate(model, PROMPTS, block_size=4, max_new_tokens=8)
    assert torch.equal(a.tokens, b.tokens)
    guided = generate(model, PROMPTS, block_size=4, max_new_tokens=8, cfg_scale=s, cache="dual")
    _check_consistent(model, guided, PROMPTS, block_size=4, max_new_tokens=8, steps=4)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refresh_is_exact(family, cache):
    """The first step of each block is the cache="none" forward: with S = 1 every block is decoded by its
    refresh step, so the outputs equal the exact engine's; with one layer the cached K/V (a function of the
    token and position only) are exact too, so every step agrees."""
    model = _with_eos(_model(family, seed=12, head_std=2.0), 4, 12)
    kw = dict(block_size=4, max_new_tokens=12, tau=0.6)
    exact = generate(model, PROMPTS, steps_per_block=1, **kw)
    out = generate(model, PROMPTS, steps_per_block=1, cache=cache, **kw)
    assert torch.equal(out.tokens, exact.tokens) and torch.equal(out.full_step_map, exact.full_step_map)
    one = tiny(family, vocab_size=V, seed=3, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
               head_std=2.0)
    exact = generate(one, PROMPTS, **kw)
    out = generate(one, PROMPTS, cache=cache, **kw)
    assert torch.equal(out.tokens, exact.tokens) and torch.equal(out.full_step_map, exact.full_step_map)
    assert torch.equal(generate(one, PROMPTS, cache="none", **kw).tokens, exact.tokens)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cache_is_approximate_and_consistent(family):
    model = _model(family, seed=13, head_std=1.0)
    kw = dict(block_size=4, max_new_tokens=12, tau=0.9)
    exact = generate(model, PROMPTS, **kw)
    for cache in ("prefix", "dual"):
        out = generate(model, PROMPTS, cache=cache, **kw)
        _check_consistent(model, out, PROMPTS, block_size=4, max_new_tokens=12, steps=4)
        agree = float((out.tokens == exact.tokens).float().mean())
        assert 0.0 < agree <= 1.0
        # the first step of the first block sees the same canvas as the exact engine
        first = (exact.full_step_map[:, :4] == 0)
        assert torch.equal(out.full_step_map[:, :4] == 0, first)
        assert torch.equal(out.tokens[:, :4][first], exact.tokens[:, :4][first])
    dual = generate(model, PROMPTS, cache="dual", **kw)
    prefix = generate(model, PROMPTS, cache="prefix", **kw)
    assert dual.forward_tokens < prefix.forward_tokens < exact.forward_tokens
    for i, p in enumerate(PROMPTS):  # a row's trajectory does not depend on the rest of the batch
        alone = generate(model, [p], cache="dual", **kw)
        assert torch.equal(alone.tokens[0], dual.tokens[i]) and torch.equal(alone.step_map[0], dual.step_map[i])


def test_peer_option_validation():
    sdar, llada = _model("sdar"), _model("llada")
    for model, kwargs, msg in [
        (llada, dict(cache="full"), "cache must be one of"), (sdar, dict(cache="dual"), "SDAR decodes against"),
        (sdar, dict(cfg_scale=1.0), "cfg_scale is supported"), (llada, dict(cfg_scale=-1.0), "cfg_scale must be"),
        (llada, dict(strategy="entropy_bounded", gamma=-1.0), "gamma must be"),
        (llada, dict(factor=0.0), "factor must be"), (llada, dict(suppress_ids=[V]), "suppress_ids must hold"),
        (llada, dict(defer_ids=["a"]), "defer_ids must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            generate(model, PROMPTS, block_size=4, max_new_tokens=4, **kwargs)


def test_engine_dense_masks_equal_the_layout_predicate():
    """The engine builds its staircase and decode masks directly (not through the layout's general predicate):
    they must be that predicate, with left pads, a prompt block that is all pads, and rows of any length."""
    import slim_rl.generate as G
    from slim_ops.layout import BlockLayout

    model = _model("sdar", seed=1)
    att = G._Attention(model, "dense", torch.float32)
    hide = torch.finfo(torch.float32).min
    L0, K, L1 = 11, 4, 12
    lens = torch.tensor([11, 7, 2, 1])
    pad = torch.arange(L0)[None, :] < (L0 - lens)[:, None]
    for Lr in (K, 2 * K, L1):
        want = BlockLayout.packed(L0, Lr, K, 0, prompt_pad=pad).dense_mask()
        got = att.stair(L0, Lr, K, pad)["attention_mask"]
        assert got.shape == (4, 1, L0 + Lr, L0 + Lr)
        assert torch.equal(got[:, 0] == 0, want) and torch.equal(got[:, 0] == hide, ~want)
    full = att.decode_full(L0, L1, K, pad)
    for b in range(L1 // K):
        Lc = L0 + b * K
        keypad = torch.cat([pad, pad.new_zeros(4, b * K)], dim=1)
        want = BlockLayout.decode(Lc, K, cache_pad=keypad).dense_mask()
        got = full[..., : Lc + K]
        assert torch.equal(got[:, 0] == 0, want.expand(4, K, Lc + K))
        assert torch.equal(att.decode(Lc, K, keypad)["attention_mask"], got)
