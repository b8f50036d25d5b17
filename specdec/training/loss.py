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
        hard, inside, soft = distillation_terms(logits[k][mask.to(logits.device)], label, soft_ids, soft_probs, vocab)
        loss_k = (1.0 - soft_weight) * hard[inside].sum() / max(int(inside.sum()), 1) + soft_weight * soft.mean()
        total = total + head_decay ** k * loss_k
        per_head.append(float(loss_k.detach()))
    return HeadLoss(total, per_head)


def distillation_terms(logits: torch.Tensor, label: torch.Tensor, soft_ids: torch.Tensor, soft_probs: torch.Tensor,
                       vocab) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [M, N]: (hard [M], inside [M], soft [M]). hard is the CE to the target's token
    ``label`` [M] (0 where ``inside`` is False: the label is outside the draft vocabulary); soft the CE to the
    target's top-k (``soft_ids``, ``soft_probs`` [M, k']) restricted to the draft vocabulary and renormalised."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [M, N]
    hard_ids = vocab.to_draft(label).to(logp.device)
    inside = hard_ids >= 0
    hard = -logp.gather(-1, hard_ids.clamp_min(0)[:, None])[:, 0] * inside
    draft = vocab.to_draft(soft_ids).to(logp.device)
    q = torch.where(draft >= 0, soft_probs.to(logp.device), 0.0)
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-8)
    soft = -(q * logp.gather(-1, draft.clamp_min(0))).sum(-1)
    return hard, inside, soft


@torch.no_grad()
def row_hits(logits: torch.Tensor, label: torch.Tensor, vocab) -> torch.Tensor:
    """FloatTensor [10]: rows of ``logits`` [M, N] whose i-th ranked token is ``label`` [M] (target ids)."""
    hits = torch.zeros(TOP_RANKS)
    ranked = logits.topk(min(TOP_RANKS, logits.shape[-1]), dim=-1).indices
    ranked = vocab.to_target(ranked).cpu()  # [M, 10] target ids
    hits[: ranked.shape[1]] += (ranked == label.cpu()[:, None]).float().sum(0)
    return hits


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
        hits[k] += row_hits(logits[k][mask.to(logits.device)], label, vocab)
        counts[k] += label.numel()
    return hits, counts


class HeadsObjective:
    """The trainer's objective for heads with a tree face (Medusa, Hydra, Clover, Chimera): ``head_losses`` on
    ``training_logits`` at every position. DEER's block objective is ``specdec.training.diffusion``."""

    def loss(self, heads, batch: Batch, recipe, device, progress: float, generator) -> HeadLoss:
        """The training loss of one batch; ``progress`` in [0, 1) is the share of planned steps already taken."""
        logits = heads.training_logits(batch.hidden.to(device), batch.tokens.to(device))
        return head_losses(logits, batch, heads.vocab, recipe.head_decay, recipe.soft_weight)

    @torch.no_grad()
    def score(self, heads, batch: Batch, recipe, device) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(held-out loss, hits [K, 10], counts [K]) of one batch."""
        logits = heads.training_logits(batch.hidden.to(device), batch.tokens.to(device))
        loss = head_losses(logits, batch, heads.vocab, recipe.head_decay, recipe.soft_weight)
        hits, counts = rank_hits(logits, batch, heads.vocab)
        return float(loss.total), hits, counts
