"""The heads' training loss and held-out metrics.

Per head k (Medusa-1, Cai et al. 2024, arXiv 2401.10774: L = sum_k lambda_k CE_k with lambda_k = 0.8^k):

    L_k = (1 - w) * CE(head_k, target's greedy token) + w * CE(head_k, target's top-k distribution)

over the positions of :meth:`Batch.head_mask`. The first term is Medusa's hard self-distilled label (what greedy
verification accepts); the second is Hydra++'s teacher distillation (arXiv 2402.05109), except that we keep only
the target's top-8 probabilities (stored per position), restricted to the draft vocabulary and renormalised; its
gradient is that of KL(teacher || head) (the teacher entropy is a constant). A hard label outside the draft
vocabulary can never be drafted: it is left out of the hard term, and counts as a miss in the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.training.batches import Batch

TOP_RANKS = 10  # accuracies[k][i] for i < 10: Medusa's tree construction reads top-10 per head


@dataclass(frozen=True)
class HeadLoss:
    total: torch.Tensor  # scalar: sum_k head_decay^k * L_k (what is minimised)
    per_head: list[float]  # L_k, unweighted, for the progress bar


def head_losses(logits: torch.Tensor, batch: Batch, vocab, head_decay: float, soft_weight: float) -> HeadLoss:
    """``logits`` [K, B, T, N] from ``training_logits``; ``vocab`` the heads' DraftVocab."""
    total = logits.new_zeros((), dtype=torch.float32)
    per_head = []
    for k in range(logits.shape[0]):
        mask = batch.head_mask(k)
        label, soft_ids, soft_probs = (x[mask] for x in batch.head_labels(k))  # [M], [M, k'], [M, k']
        if label.numel() == 0:
            per_head.append(0.0)
            continue
        logp = torch.log_softmax(logits[k][mask.to(logits.device)].float(), dim=-1)  # [M, N]
        hard_ids = vocab.to_draft(label).to(logp.device)
        inside = hard_ids >= 0
        hard = -(logp[inside, hard_ids[inside]]).sum() / max(int(inside.sum()), 1)
        draft = vocab.to_draft(soft_ids).to(logp.device)
        q = torch.where(draft >= 0, soft_probs.to(logp.device), 0.0)
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-8)
        soft = -(q * logp.gather(-1, draft.clamp_min(0))).sum(-1).mean()
        loss_k = (1.0 - soft_weight) * hard + soft_weight * soft
        total = total + head_decay ** k * loss_k
        per_head.append(float(loss_k.detach()))
    return HeadLoss(total, per_head)


@torch.no_grad()
def rank_hits(logits: torch.Tensor, batch: Batch, vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits [K, 10], counts [K]): hits[k, i] = positions where head k's i-th ranked token is the target's."""
    k_heads = logits.shape[0]
    hits = torch.zeros(k_heads, TOP_RANKS)
    counts = torch.zeros(k_heads)
    for k in range(k_heads):
        mask = batch.head_mask(k)
        label = batch.head_labels(k)[0][mask]
        if label.numel() == 0:
            continue
        ranked = logits[k][mask.to(logits.device)].topk(min(TOP_RANKS, logits.shape[-1]), dim=-1).indices
        ranked = vocab.to_target(ranked).cpu()  # [M, 10] target ids
        hits[k, : ranked.shape[1]] += (ranked == label[:, None]).float().sum(0)
        counts[k] += label.numel()
    return hits, counts
