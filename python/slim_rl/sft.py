"""Masked-diffusion supervised fine-tuning (the demo's first stage).

For a demonstration (prompt, response + EOS) each training row draws a noise level t ~ U(0, 1), masks
every response position with probability t (at least one), and minimises the cross-entropy of the
clean tokens at the masked positions of ``[P ‖ C ‖ X]`` — the same sequence layout, block mask and
log-prob op the RL stage trains with, so SFT and RL see identical blocks.
"""

from __future__ import annotations

import math
import random

import torch

import slim_ops
from slim_rl.config import Config
from slim_rl.tasks import pad_left, pad_right
from slim_rl.trainer import noisy_stream_hidden, seeded

__all__ = ["sft"]


def sft(model: torch.nn.Module, task, cfg: Config, *, device: str = "cpu", progress: bool = True,
        log=None) -> list[dict[str, float]]:
    """Train ``model`` in place on ``task.demonstrations`` for ``cfg.sft.steps`` AdamW steps.

    Returns one record per logged step (``{"sft_step", "sft_loss", "lr"}``).
    """
    sc = cfg.sft
    if sc.steps <= 0:
        return []
    K = cfg.rollout.block_size
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, betas=(0.9, 0.98), weight_decay=sc.weight_decay)
    rng = random.Random(int(seeded(cfg.train.seed, "sft-data").initial_seed()))
    gen = seeded(cfg.train.seed, "sft-noise")
    mask_id, pad_id = int(model.mask_id), int(model.pad_id)
    head = model.get_output_embeddings()
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sc.steps, desc="SFT", dynamic_ncols=True, mininterval=1.0)
    records: list[dict[str, float]] = []
    for step in range(sc.steps):
        warm = min(1.0, (step + 1) / sc.warmup_steps) if sc.warmup_steps else 1.0
        lr = sc.lr * warm * 0.5 * (1.0 + math.cos(math.pi * step / sc.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        demos = task.demonstrations(sc.batch_size, rng)
        prompt, ppad = pad_left([d[0] for d in demos], pad_id)
        clean, lens = pad_right([d[1] for d in demos], pad_id)
        L1 = -(-clean.shape[1] // K) * K
        clean = torch.nn.functional.pad(clean, (0, L1 - clean.shape[1]), value=pad_id)
        valid = torch.arange(L1)[None, :] < lens[:, None]
        t = torch.rand(len(demos), 1, generator=gen)
        noise = (torch.rand(clean.shape, generator=gen) < t) & valid
        empty = ~noise.any(dim=1)
        forced = (torch.rand(len(demos), generator=gen) * lens.float()).long().clamp(max=lens - 1)
        noise[empty, forced[empty]] = True
        noisy = torch.where(noise, torch.full_like(clean, mask_id), clean)
        dev = device
        h = noisy_stream_hidden(model, prompt.to(dev), ppad.to(dev), clean.to(dev), noisy.to(dev), K)
        nz = noise.to(dev)
        logp = slim_ops.masked_logprob(h[nz], head.weight, clean.to(dev)[nz])
        loss = -logp.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == sc.steps - 1:
            rec = {"sft_step": step + 1, "sft_loss": float(loss.detach()), "lr": lr}
            records.append(rec)
            if log is not None:
                log(rec)
        if bar is not None:
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    if bar is not None:
        bar.close()
    return records
