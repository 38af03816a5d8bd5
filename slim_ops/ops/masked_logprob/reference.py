"""Per-token log-probabilities of the masked rows (docs/objective.md, 'Log-probabilities') in plain fp32 PyTorch: the
executable spec.

    z      = (hidden · weightᵀ) / T                       [N, V]   (materialised here only)
    logp_i = z_{i, y_i} − logsumexp_v z_{i, v}
    H_i    = logsumexp_v z_{i, v} − Σ_v softmax(z_i)_v · z_{i, v}
Autograd through these functions is the reference gradient (entropy is a metric: no gradient).
"""

from __future__ import annotations

import torch


def logprob_from_logits_ref(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """logits [N, V], labels [N] -> (logp [N], entropy [N] detached); fp32 math (fp64 for fp64 input)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, labels.long().unsqueeze(1)).squeeze(1) - lse
    with torch.no_grad():
        p = torch.softmax(z, dim=-1)
        entropy = lse - (p * z).sum(-1)
    return logp, entropy


def masked_logprob_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       temperature: float = 1.0):
    """hidden [N, d], weight [V, d], labels [N] -> (logp [N], entropy [N]) via full fp32 (fp64) logits."""
    dt = torch.promote_types(hidden.dtype, torch.float32)
    return logprob_from_logits_ref(hidden.to(dt) @ weight.to(dt).t(), labels, temperature)
