"""What a training step minimises: next-token cross-entropy on the scored tokens (SFT), and DPO's preference
loss on sequence log-likelihoods.

Both ask the model for logits at the scored positions only (`logits_to_keep` as a mask): with a 262k
vocabulary the head and its softmax are most of the cost of a short sequence, and prompts are not scored.
Losses are returned as sums with their counts, so a step can divide by the token (or pair) count of the whole
global batch: gradient accumulation and data-parallel ranks then give exactly the gradient of one big batch.
Rows with images or audio pass their soft tokens (`media`, fixed inputs from the frozen towers) to the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmakit.media.soft import Media
from gemmakit.train.data import IGNORE


def token_logps(model: nn.Module, ids: Tensor, labels: Tensor, media: Media | None = None) -> tuple[Tensor, Tensor]:
    """log p(label) at every scored position, and the batch row each belongs to."""
    scored = labels[:, 1:] != IGNORE
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :-1] = scored  # position t predicts token t + 1
    logits = model(ids, logits_to_keep=keep, media=media).float()
    logp = -F.cross_entropy(logits, labels[:, 1:][scored], reduction="none")
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(scored)[scored]
    return logp, rows


def sft_loss(model: nn.Module, ids: Tensor, labels: Tensor, media: Media | None = None) -> tuple[Tensor, int]:
    """(sum of the token losses, number of scored tokens)."""
    logp, _ = token_logps(model, ids, labels, media)
    return -logp.sum(), logp.numel()


def sequence_logps(model: nn.Module, ids: Tensor, labels: Tensor, media: Media | None = None) -> Tensor:
    """Sum of log p over each row's scored tokens: [B]."""
    logp, rows = token_logps(model, ids, labels, media)
    return torch.zeros(ids.shape[0], device=ids.device).index_add(0, rows, logp)


def dpo_loss(policy: Tensor, reference: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """DPO (Rafailov et al. 2023) over rows ordered chosen, rejected, chosen, rejected, ...: per-pair losses
    -log sigmoid(beta * margin) and the margins, margin = (policy - reference) of chosen minus of rejected."""
    delta = (policy - reference.to(policy.dtype)).view(-1, 2)
    margin = delta[:, 0] - delta[:, 1]
    return -F.logsigmoid(beta * margin), margin.detach()
