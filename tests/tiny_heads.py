"""Draft heads for the tiny test targets: built as the papers initialise them, then perturbed so that every learned
weight matters (at init the heads are the identity on h and ignore the path tokens)."""

from __future__ import annotations

import torch

from specdec.drafters.heads import DraftHeads, DraftVocab, build_heads
from tiny_models import VOCAB, greedy_reference, tiny_prompt

KINDS = ("medusa", "hydra", "clover", "chimera", "deer")
SMALL = {"medusa": {}, "hydra": {"rank": 16},
         "chimera": {"trigram_rank": 32, "rank": 16, "mlp_size": 32, "num_attention_heads": 4, "head_dim": 8},
         "deer": {"inner_size": 32, "num_layers": 2, "num_attention_heads": 4, "mlp_size": 32},
         "clover": {"rank": 32, "mlp_size": 32, "num_attention_heads": 4,
                                                          "head_dim": 8}}


def perturbed_heads(kind: str, target: torch.nn.Module, seed: int = 0, draft_vocab: DraftVocab | None = None,
                    scale: float = 0.3, num_heads: int = 4) -> DraftHeads:
    g = torch.Generator().manual_seed(seed)
    heads = build_heads(kind, target, num_heads=num_heads, draft_vocab=draft_vocab, generator=g, **SMALL[kind])
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
    return heads.eval()


def reduced_vocab(target: torch.nn.Module, size: int = VOCAB // 2) -> DraftVocab:
    """The ``size`` most frequent tokens of two greedy continuations of the target (so drafts can be right)."""
    counts = torch.zeros(VOCAB)
    for seed in (0, 1):
        counts += torch.bincount(greedy_reference(target, tiny_prompt(seed=seed), 40)[0], minlength=VOCAB)
    return DraftVocab.from_counts(counts, size)


def tiny_acceptance_head(draft, target, seed: int = 0, bias: float = 0.0) -> str:
    """A randomly initialised SpecDec++ acceptance head for a tiny (draft, target) pair, saved to a temporary
    folder (returned); ``bias`` shifts its logit."""
    import tempfile

    from specdec.drafters.acceptance import AcceptanceHead, save_acceptance_head
    from specdec.drafters.heads.fingerprint import target_fingerprint

    head = AcceptanceHead(draft.config.hidden_size).init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        head.out.bias.fill_(bias)
    head.meta = {"draft": target_fingerprint(draft), "target": target_fingerprint(target)}
    return str(save_acceptance_head(head, tempfile.mkdtemp(prefix="specdecpp-")))
