"""Masked-diffusion supervised fine-tuning (the demo's first stage).

For a demonstration (prompt, response + EOS) each training row draws a noise level t ~ U(0, 1), masks
every response position with probability t (at least one), and minimises the cross-entropy of the
clean tokens at the masked positions of ``[P ‖ C ‖ X]`` — the same sequence layout, block mask and
log-prob op the RL stage trains with, so SFT and RL see identical blocks. It runs through the
trainer's (DDP- or FSDP2-wrapped) :class:`~slim_rl.trainer.Scorer`: under torchrun each rank takes its
share of every batch (the batch itself is drawn identically everywhere). A step with a non-finite loss
or gradient norm is skipped; ``train.max_skipped_updates`` in a row stop the stage with an error.
"""

from __future__ import annotations

import math
import random

import torch

from slim_rl import distributed as D
from slim_rl.tasks import pad_left, pad_right
from slim_rl.trainer import seeded

__all__ = ["sft"]


def sft(trainer, *, progress: bool = True, log=None) -> list[dict[str, float]]:
    """Train ``trainer.model`` in place on ``trainer.task.demonstrations`` for ``cfg.sft.steps`` AdamW steps.

    Returns one record per logged step (``{"sft_step", "sft_loss", "lr"}``).
    """
    from slim_rl.trainer import TrainingError

    cfg, info, model, task = trainer.cfg, trainer.info, trainer.model, trainer.task
    sc = cfg.sft
    if sc.steps <= 0:
        return []
    K = cfg.rollout.block_size
    trainer.reshard()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sc.lr, betas=(0.9, 0.98), weight_decay=sc.weight_decay)
    rng = random.Random(int(seeded(cfg.train.seed, "sft-data").initial_seed()))
    gen = seeded(cfg.train.seed, "sft-noise")
    mask_id, pad_id = int(model.mask_id), int(model.pad_id)
    dev, W = trainer.device, info.world
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sc.steps, desc="SFT", dynamic_ncols=True, mininterval=1.0)
    records: list[dict[str, float]] = []
    streak = 0
    for step in range(sc.steps):
        warm = min(1.0, (step + 1) / sc.warmup_steps) if sc.warmup_steps else 1.0
        lr = sc.lr * warm * 0.5 * (1.0 + math.cos(math.pi * step / sc.steps))
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
        total = int(noise.sum())
        # this rank's rows (a zero-weight filler row when it has none: every rank runs one forward)
        mine = torch.arange(info.rank, len(demos), W)
        scale = W / total
        if mine.numel() == 0:
            mine, scale = torch.arange(1), 0.0
        opt.zero_grad(set_to_none=True)
        with trainer.autocast():
            logp = trainer.scorer(prompt[mine].to(dev), ppad[mine].to(dev), clean[mine].to(dev),
                                  noisy[mine].to(dev), clean[mine].to(dev), noise[mine].to(dev))
        loss = -logp.sum() * scale
        loss.backward()
        local = float(loss.detach())
        stepped, _ = trainer.optimizer_step(opt, params, grad_clip=1.0, lr=lr, loss_finite=math.isfinite(local))
        streak = 0 if stepped else streak + 1
        if streak >= cfg.train.max_skipped_updates:
            raise TrainingError(f"SFT stopped at step {step + 1}: {streak} consecutive steps had a non-finite "
                                f"loss or gradient norm (train.max_skipped_updates={cfg.train.max_skipped_updates})"
                                "; lower sft.lr")
        if step % 25 == 0 or step == sc.steps - 1:
            part = D.all_gather_objects(local, info) if info.active else [local]
            rec = {"sft_step": step + 1, "sft_loss": sum(part) / W, "lr": lr, "skipped": int(not stepped)}
            records.append(rec)
            if log is not None:
                log(rec)
        if bar is not None:
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{local / W:.3f}")
    if bar is not None:
        bar.close()
    return records
