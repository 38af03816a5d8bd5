"""Sharded atomic checkpoints (torch.distributed.checkpoint): round trip, commit marker, damaged / cut-off
checkpoints never loaded, nothing unpickled, non-finite weights refused, run-folder rules, HF export."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from slim_rl import checkpoint as C
from slim_rl.errors import CheckpointError, RunFolderError


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _step(model, opt):
    loss = model(torch.randn(3, 4)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _rehash(path):
    """Recompute the manifest after tampering (a crafted checkpoint that passes the integrity check)."""
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    for n in m["files"]:
        p = os.path.join(path, n)
        m["files"][n] = {"bytes": os.path.getsize(p), "sha256": C._sha256(p)}
    with open(mpath, "w") as f:
        json.dump(m, f)


def test_round_trip_weights_optimizer_rng_step(tmp_path):
    m = _model(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.8, 0.95))
    _step(m, opt)
    random.seed(5)
    torch.manual_seed(6)
    path = C.save_checkpoint(str(tmp_path), 3, m, opt, extra={"updates": 9})
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "manifest.json", "rng_0.pt", "trainer.json"]
    expect_py, expect_t = random.random(), torch.rand(3)
    m2 = _model(1)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    st = C.load_checkpoint(path, m2, opt2)
    assert st == {"step": 3, "extra": {"updates": 9}}
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
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


def test_optimizer_without_state_is_not_stored(tmp_path):
    """Saving must not change a fresh optimizer (no zero step that would shift Adam's bias correction)."""
    m = _model(0)
    opt = torch.optim.AdamW(m.parameters())
    path = C.save_checkpoint(str(tmp_path), 0, m, opt)
    assert len(opt.state) == 0
    opt2 = torch.optim.AdamW(_model(1).parameters())
    C.load_checkpoint(path, _model(1), opt2)
    assert len(opt2.state) == 0


def test_cut_off_and_damaged_checkpoints_are_never_loaded(tmp_path, monkeypatch):
    d = str(tmp_path)
    m = _model(0)
    opt = torch.optim.AdamW(m.parameters())
    _step(m, opt)
    good = C.save_checkpoint(d, 2, m, opt)
    assert C.latest_checkpoint(d) == good
    # 1) killed after the shards were written, before the commit: only a .tmp directory exists; it is
    #    removed when the next run starts
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    with monkeypatch.context() as mp:
        mp.setattr(C, "_gather", boom)
        with pytest.raises(KeyboardInterrupt):
            C.save_checkpoint(d, 4, m, opt)
    assert "__0_0.distcp" in os.listdir(os.path.join(d, "step_00000004.tmp"))
    assert "step_00000004.tmp" in os.listdir(d)
    assert C.latest_checkpoint(d) == good
    assert C.clean_stale(d) == ["step_00000004.tmp"] and "step_00000004.tmp" not in os.listdir(d)
    # 2) a committed checkpoint whose shard was cut short: not listed, not loadable
    bad = C.save_checkpoint(d, 6, m, opt)
    with open(os.path.join(bad, "__0_0.distcp"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    assert C.latest_checkpoint(d) == good
    with pytest.raises(CheckpointError, match="incomplete or damaged"):
        C.load_checkpoint(bad, _model(0))
    # 3) same size, one flipped byte: listed (cheap size check) but the hash check refuses it on load
    bad2 = C.save_checkpoint(d, 8, m, opt)
    p = os.path.join(bad2, "__0_0.distcp")
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert not C.verify_checkpoint(bad2)
    with pytest.raises(CheckpointError, match="incomplete or damaged"):
        C.load_checkpoint(bad2, _model(0))
    # 4) no manifest (the commit marker, written last) -> not a checkpoint
    bad3 = C.save_checkpoint(d, 10, m, opt)
    os.remove(os.path.join(bad3, "manifest.json"))
    assert C.latest_checkpoint(d) == bad2 and C.verify_checkpoint(good)


def test_loading_never_unpickles_code(tmp_path):
    """A crafted checkpoint (a pickle that runs code, with a recomputed manifest) is refused by
    ``weights_only=True`` without running anything."""
    m = _model(0)
    path = C.save_checkpoint(str(tmp_path / "ck"), 1, m, None)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"python": Evil()}, os.path.join(path, "rng_0.pt"))
    _rehash(path)
    assert C.verify_checkpoint(path)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        C.load_checkpoint(path, _model(1))
    assert not marker.exists()
    # DCP's own .metadata is a pickle too: read through an allow-list
    path = C.save_checkpoint(str(tmp_path / "ck2"), 1, m, None)
    import pickle

    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(Evil(), f)
    _rehash(path)
    with pytest.raises(CheckpointError, match="refers to (io|builtins).open, which is not allowed"):
        C.load_weights(path, _model(1))
    assert not marker.exists()


def test_keep_prunes_old_checkpoints(tmp_path):
    m = _model(0)
    for s in (1, 2, 3, 4):
        C.save_checkpoint(str(tmp_path), s, m, None, keep=2)
    names = [os.path.basename(p) for p in C.list_checkpoints(str(tmp_path))]
    assert names == ["step_00000003", "step_00000004"]


def test_mismatched_model_is_an_error(tmp_path):
    path = C.save_checkpoint(str(tmp_path), 1, _model(0), None)
    with pytest.raises(CheckpointError, match="does not match the model"):
        C.load_checkpoint(path, torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)))
    with pytest.raises(CheckpointError, match="does not match the model"):
        C.load_checkpoint(path, torch.nn.Linear(2, 2))


def test_non_finite_weights_are_never_written(tmp_path):
    m = _model(0)
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        C.save_checkpoint(str(tmp_path), 1, m, None)
    with torch.no_grad():
        m[0].weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="non-finite"):
        C.save_checkpoint(str(tmp_path), 1, m, None)
    assert C.list_checkpoints(str(tmp_path)) == []


def test_run_folder_rules(tmp_path):
    run = str(tmp_path / "run")
    assert C.check_run_folder(run) is None                      # a new folder: fine
    with pytest.raises(RunFolderError, match="no checkpoint to resume"):
        C.check_run_folder(run, resume=True)
    with pytest.raises(RunFolderError, match="exclude"):
        C.check_run_folder(run, resume=True, overwrite=True)
    path = C.save_checkpoint(os.path.join(run, "checkpoints"), 3, _model(0), None)
    with pytest.raises(RunFolderError, match="--resume .*--overwrite"):
        C.check_run_folder(run)
    assert C.check_run_folder(run, overwrite=True) is None
    assert C.check_run_folder(run, resume=True) == path
    os.remove(os.path.join(path, "manifest.json"))                 # only a damaged one left
    with pytest.raises(RunFolderError, match="only incomplete or damaged: step_00000003"):
        C.check_run_folder(run, resume=True)
    # clear_run_files removes only what a run writes
    (tmp_path / "run" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    C.clear_run_files(run)
    assert sorted(os.listdir(run)) == ["notes.txt"]


def test_export_is_a_hugging_face_folder(tmp_path):
    """A training checkpoint exported to one safetensors folder reads back with slim_rl.models.load and
    transformers, with the same weights and logits."""
    import transformers

    from slim_rl import models

    src = models.tiny("sdar", vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=3)
    path = C.save_checkpoint(str(tmp_path / "ck"), 5, src, None)
    dst = models.tiny("sdar", vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=4)
    assert C.load_weights(path, dst) == 5
    out = C.export_model(dst, str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    ids = torch.randint(0, 13, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = src(input_ids=ids).logits
        a = models.load(out, "sdar")
        b = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        assert (a.mask_id, a.eos_id, a.pad_id) == (src.mask_id, src.eos_id, src.pad_id)
        assert torch.equal(a(input_ids=ids).logits, ref)
    sd = src.state_dict()
    for k, v in b.state_dict().items():   # plain transformers: the same tensors (its own causal masking)
        assert torch.equal(v, sd[k]), k
    with pytest.raises(RunFolderError, match="not empty"):
        C.export_model(dst, out)
