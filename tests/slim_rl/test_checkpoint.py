"""Atomic checkpoints: round trip, and a checkpoint cut off mid-write is never loaded."""

from __future__ import annotations

import os
import random

import pytest
import torch

from slim_rl import checkpoint as C


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _step(model, opt):
    loss = model(torch.randn(3, 4)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_round_trip_weights_optimizer_rng_step(tmp_path):
    m = _model(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _step(m, opt)
    random.seed(5)
    torch.manual_seed(6)
    path = C.save_checkpoint(str(tmp_path), 3, m, opt, extra={"updates": 9})
    expect_py, expect_t = random.random(), torch.rand(3)
    m2 = _model(1)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    st = C.load_checkpoint(path, m2, opt2)
    assert st == {"step": 3, "extra": {"updates": 9}}
    assert random.random() == expect_py and torch.equal(torch.rand(3), expect_t)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # the optimizer state continues identically
    torch.manual_seed(0)
    _step(m, opt)
    torch.manual_seed(0)
    _step(m2, opt2)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_cut_off_checkpoints_are_never_loaded(tmp_path, monkeypatch):
    d = str(tmp_path)
    m = _model(0)
    opt = torch.optim.AdamW(m.parameters())
    good = C.save_checkpoint(d, 2, m, opt)
    assert C.latest_checkpoint(d) == good
    # 1) killed before the rename: only a .tmp directory exists
    real_rename = os.rename

    def boom(src, dst):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(d, 4, m, opt)
    monkeypatch.setattr(os, "rename", real_rename)
    assert any(".tmp-" in n for n in os.listdir(d))
    assert C.latest_checkpoint(d) == good
    # 2) a final-named directory whose weights were cut short (e.g. copied while being written)
    bad = C.save_checkpoint(d, 6, m, opt)
    with open(os.path.join(bad, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    assert C.latest_checkpoint(d) == good
    with pytest.raises(ValueError, match="incomplete or damaged"):
        C.load_checkpoint(bad, _model(0))
    # 3) no manifest (written last) -> not complete
    bad2 = C.save_checkpoint(d, 8, m, opt)
    os.remove(os.path.join(bad2, "manifest.json"))
    assert C.latest_checkpoint(d) == good


def test_keep_prunes_old_checkpoints(tmp_path):
    m = _model(0)
    for s in (1, 2, 3, 4):
        C.save_checkpoint(str(tmp_path), s, m, None, keep=2)
    names = [os.path.basename(p) for p in C.list_checkpoints(str(tmp_path))]
    assert names == ["step_00000003", "step_00000004"]


def test_mismatched_model_is_an_error(tmp_path):
    path = C.save_checkpoint(str(tmp_path), 1, _model(0), None)
    with pytest.raises(ValueError, match="does not match the model"):
        C.load_checkpoint(path, torch.nn.Linear(2, 2))
