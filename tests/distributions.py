"""Checks that sampled tokens follow a known distribution: exact enumeration helpers and a chi-square test.

The chi-square test needs no scipy: cells expected to hold fewer than ``MIN_EXPECTED`` samples are pooled into one
cell, and the statistic is compared with the chi-square quantile from the Wilson-Hilferty approximation (within ~1%
of the exact quantile for df >= 3; the tests use seeded generators, so each verdict is reproducible). A sample in a
cell of probability 0 fails the check outright.
"""

from __future__ import annotations

import itertools
import math

import torch

MIN_EXPECTED = 5.0
Z_0999 = 3.090232  # standard normal 0.999 quantile
Z_09995 = 3.290527  # 0.9995: two tests at 0.05% each


def chi2_quantile(df: int, z: float = Z_0999) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile with ``df`` degrees of freedom at Phi(z)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) of ``counts`` [C] against cell probabilities ``probs`` [C]; inf if a sample
    fell in an impossible cell."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = float(counts.sum())
    if bool((counts[probs <= 0] > 0).any()):
        return math.inf, 1
    expected = probs * n
    small = expected < MIN_EXPECTED
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), max(int(keep.sum()) - 1, 1)


def follows(counts: torch.Tensor, probs: torch.Tensor, z: float = Z_0999) -> bool:
    """True unless the chi-square test rejects "counts were drawn from probs" at the level 1 - Phi(z) (0.1%)."""
    stat, df = chi_square(counts, probs)
    return stat < chi2_quantile(df, z)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a.double() - b.double()).abs().sum())


# ---------------------------------------------------------------------------------------------- exact enumeration
def iid_drafts(q: torch.Tensor, k: int):
    """Every ordered k-tuple of i.i.d. draws from q [V], with its probability."""
    support = torch.nonzero(q > 0).flatten().tolist()
    for tokens in itertools.product(support, repeat=k):
        yield torch.tensor(tokens), math.prod(float(q[x]) for x in tokens)


def without_replacement_drafts(q: torch.Tensor, k: int):
    """Every ordered k-tuple of sequential draws from q [V] without replacement, with its probability."""
    support = torch.nonzero(q > 0).flatten().tolist()
    for tokens in itertools.permutations(support, k):
        prob, left = 1.0, 1.0
        for x in tokens:
            prob *= float(q[x]) / left
            left -= float(q[x])
        yield torch.tensor(tokens), prob


# ---------------------------------------------------------------------------------------------- a wrong rule
def claim_uniform_q(drafter, vocab_size: int) -> None:
    """Make ``drafter`` misreport its proposals' q as uniform while still drawing from its own q: a lossless rule
    fed this must fail the distribution tests that pass with the true q."""
    from specdec.tree import DraftTree

    propose = drafter.propose

    def claim_uniform(state):
        tree = propose(state)
        probs = None if tree.draft_probs is None else torch.full_like(tree.draft_probs, 1 / vocab_size)
        return DraftTree(tree.tokens, tree.parents, probs, tree.proposal)

    drafter.propose = claim_uniform
