"""LoRA (model.lora.r > 0): only the adapters train and are checkpointed; the KL reference is the base model
(adapters switched off) with exactly the base model's log-probs; export merges the adapters into a plain
checkpoint that slim_rl.models.load and transformers read, with the adapted model's logits."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_distributed import TINY, _fixed_batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORA = ["model.lora.r=4", "model.lora.alpha=8", "objective.kl_reference=ref", "model.hidden_size=64",
        "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=2"]


def _trainer(out, extra=()):
    from slim_rl.config import load_config
    from slim_rl.trainer import Trainer

    return Trainer(load_config(None, TINY + LORA + [f"train.out_dir={out}", *extra]))


def test_only_adapters_train_and_the_reference_is_the_base(tmp_path):
    from slim_rl.trainer import Trainer

    tr = _trainer(tmp_path / "run")
    names = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    batch = _fixed_batch(tr.pad_id, tr.eos_id)
    tr.init_reference()
    rec = tr.update(batch, 1)
    assert rec["grad_norm"] > 0 and rec["kl"] > 0  # epoch 2: the adapters have moved away from the base
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    # the reference (adapters off, through the same scorer) = a model built without adapters, exactly
    from slim_rl.config import load_config

    base = Trainer(load_config(None, TINY + [o for o in LORA if not o.startswith(("model.lora", "objective.kl"))]
                               + [f"train.out_dir={tmp_path / 'base'}"]))
    rows = tr.build_rows(batch, 2)
    ref = tr._logp_ref(rows)
    assert torch.equal(ref, base._logp_old(rows))
    assert not torch.equal(tr._logp_old(rows), ref)  # and the adapted model differs from it
    assert not os.path.exists(os.path.join(tr.out_dir, "reference"))  # no second copy saved


def test_checkpoint_holds_adapters_and_export_merges(tmp_path):
    import torch.distributed.checkpoint as dcp

    from slim_rl import models

    out = tmp_path / "run"
    tr = _trainer(out, ["train.steps=2"])
    tr.task.reward = lambda responses, examples: [float(len(r) > 0 and int(r[0]) % 2 == 0) for r in responses]
    tr.train()
    assert all(float(p.abs().sum()) > 0 for n, p in tr.model.named_parameters() if ".lora_B." in n)
    ck = os.path.join(tr.ckpt_dir, "step_00000002")
    keys = list(dcp.FileSystemReader(ck).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys[:5]
    # resume: a new trainer (base rebuilt from the config) holds the same adapted model
    tr2 = _trainer(out, ["train.steps=2"])
    tr2.resume()
    assert all(torch.equal(p, q) for p, q in zip(tr.model.state_dict().values(), tr2.model.state_dict().values()))
    # export: adapters merged, fp32, read back by slim_rl.models.load and transformers
    hf = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")])}
    r = subprocess.run([sys.executable, "-m", "slim_rl", "export", "--out", str(out), "--to", str(hf), "--dtype",
                        "float32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = models.load(str(hf), "sdar")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(hf), local_files_only=True)
    ids = torch.randint(0, 13, (3, 11), generator=torch.Generator().manual_seed(5))
    # an explicit 4-D mask, as the engine and the trainer always pass (the families' own causal flags differ)
    mask = torch.zeros(3, 1, 11, 11)
    mask[:, :, torch.triu(torch.ones(11, 11, dtype=torch.bool), 1)] = torch.finfo(torch.float32).min
    tr.model.eval()
    with torch.no_grad():
        want = tr.model(input_ids=ids, attention_mask=mask).logits
        for m in (merged, plain):
            got = m.eval()(input_ids=ids, attention_mask=mask).logits
            rel = float((got - want).abs().max() / want.abs().max())
            assert rel <= 1e-5, (type(m).__name__, rel)
