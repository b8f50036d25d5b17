"""The verifiers' rules are lossless (``verifiers/rejection.py``, ``spectr.py``) or measurably biased (``typical.py``),
and each check fails for a deliberately wrong rule.

  exact        one node's rule (its ``trial``: acceptance probabilities + residual) over every possible draft,
               enumerated with its probability: the first emitted token is distributed as p, to 1e-9
  monte carlo  verify() on depth-2 trees drawn from known Markov tables q, against known tables p: chi-square test
               on the first two emitted tokens
  typical      Medusa typical acceptance is measurably biased (it is documented as lossy)
"""

from __future__ import annotations


import pytest
import torch

from distributions import chi_square, follows, iid_drafts, total_variation, without_replacement_drafts
from specdec.sampling import SamplingConfig
from specdec.tree import DraftTree, ProposalKind
from specdec.verifiers import create_verifier
from specdec.verifiers.rejection import RejectionVerifier, SiblingTrial, iid_trial, normalize
from specdec.verifiers.spectr import SpecTrVerifier, kseq_beta, kseq_rho
from specdec.verifiers.typical import TypicalVerifier, typical_threshold

IID, WOR, POINT = ProposalKind.IID, ProposalKind.WITHOUT_REPLACEMENT, ProposalKind.POINT_MASS


# ---------------------------------------------------------------------------------------------- exact, per node
class AlwaysAccept(RejectionVerifier):
    """Wrong: accepts every draft token."""

    def trial(self, p, tokens, q, kind):
        right = super().trial(p, tokens, q, kind)
        return SiblingTrial(torch.ones_like(right.accept_probs), right.residual)


class ResidualNotRenormalized(RejectionVerifier):
    """Wrong (IID): the next sibling is tried against max(0, r - q) without renormalising it."""

    def trial(self, p, tokens, q, kind):
        residual, accept = p, []
        for j, x in enumerate(tokens.tolist()):
            accept.append((residual[x] / q[j, x]).clamp(max=1.0))
            residual = (residual - q[j]).clamp_min(0.0)
        return SiblingTrial(torch.stack(accept), residual / residual.sum())  # the final draw normalises anyway


class ResidualWithoutMax(RejectionVerifier):
    """Wrong: recovers from (p - q) / sum(max(0, p - q)), negative entries and all."""

    def trial(self, p, tokens, q, kind):
        residual, accept = p, []
        for j, x in enumerate(tokens.tolist()):
            accept.append((residual[x] / q[j, x]).clamp(max=1.0))
            residual = (residual - q[j]) / (residual - q[j]).clamp_min(0.0).sum()
        return SiblingTrial(torch.stack(accept), residual)


class ResidualIsTarget(RejectionVerifier):
    """Wrong: after a rejection draws the recovered token from p itself rather than from the residual."""

    def trial(self, p, tokens, q, kind):
        right = super().trial(p, tokens, q, kind)
        return SiblingTrial(right.accept_probs, p)


class WithoutReplacementAsIID(RejectionVerifier):
    """Wrong (EAGLE-1 trees): keeps using q itself instead of q with the tried siblings zeroed and renormalised."""

    def trial(self, p, tokens, q, kind):
        return iid_trial(p, tokens, q)


class PointMassNotRenormalized(RejectionVerifier):
    """Wrong (EAGLE-2 trees): zeroes a rejected token's probability but does not renormalise."""

    def trial(self, p, tokens, q, kind):
        residual, accept = p, []
        for x in tokens.tolist():
            accept.append(residual[x])
            residual = residual.index_fill(0, torch.tensor([x]), 0.0)
        return SiblingTrial(torch.stack(accept), residual / residual.sum())


class SpecTrRhoOne(SpecTrVerifier):
    """Wrong (k >= 2): K-SEQ with rho = 1 instead of rho*, i.e. plain min(1, p/q) for every draft."""

    def trial(self, p, tokens, q, kind):
        k, q0 = tokens.numel(), q[0]
        beta = kseq_beta(p, q0, torch.ones(()))
        none = (1 - beta) ** k
        residual = (p - torch.minimum(q0, p) * (1 - none) / beta) / none
        return SiblingTrial((p[tokens] / q0[tokens]).clamp(max=1.0), normalize(residual.clamp_min(0), p))


# Target p and draft q over a 5-token vocabulary; the second pair has tokens p filters out and q never drafts.
P_Q = {
    "spread": (torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05], dtype=torch.float64),
               torch.tensor([0.05, 0.15, 0.20, 0.25, 0.35], dtype=torch.float64)),
    "zeros": (torch.tensor([0.50, 0.30, 0.00, 0.20, 0.00], dtype=torch.float64),
              torch.tensor([0.00, 0.20, 0.30, 0.10, 0.40], dtype=torch.float64)),
}
# (verifier, proposal, k or the fixed point-mass candidates, lossless?)
RULES = {
    "rejection-chain": (RejectionVerifier(), IID, 1, True),
    "rejection-iid-3": (RejectionVerifier(), IID, 3, True),
    "rejection-without-replacement-2": (RejectionVerifier(), WOR, 2, True),
    "rejection-without-replacement-3": (RejectionVerifier(), WOR, 3, True),
    "rejection-point-mass": (RejectionVerifier(), POINT, [3, 1, 2], True),
    "rejection-point-mass-repeated": (RejectionVerifier(), POINT, [1, 1, 4, 1], True),
    "spectr-1": (SpecTrVerifier(), IID, 1, True),
    "spectr-2": (SpecTrVerifier(), IID, 2, True),
    "spectr-3": (SpecTrVerifier(), IID, 3, True),
    "spectr-without-replacement-3": (SpecTrVerifier(), WOR, 3, True),  # not i.i.d.: the EAGLE-1 rule
    "broken-always-accept": (AlwaysAccept(), IID, 1, False),
    "broken-residual-not-renormalized": (ResidualNotRenormalized(), IID, 3, False),
    "broken-residual-without-max": (ResidualWithoutMax(), IID, 1, False),
    "broken-residual-is-target": (ResidualIsTarget(), IID, 1, False),
    "broken-without-replacement-as-iid": (WithoutReplacementAsIID(), WOR, 3, False),
    "broken-point-mass-not-renormalized": (PointMassNotRenormalized(), POINT, [3, 1, 2], False),
    "broken-spectr-rho-1": (SpecTrRhoOne(), IID, 3, False),
}


def exact_first_token(verifier, p: torch.Tensor, q: torch.Tensor, kind: ProposalKind, k) -> torch.Tensor:
    """DoubleTensor [V]: distribution of the token one node emits, summed over every draft with its probability."""
    if kind is POINT:
        drafts = [(torch.tensor(k), 1.0)]
    else:
        drafts = (iid_drafts if kind is IID else without_replacement_drafts)(q, k)
    out = torch.zeros_like(p)
    for tokens, prob in drafts:
        rows = None if kind is POINT else q.expand(tokens.numel(), -1)
        out += prob * verifier.trial(p, tokens, rows, kind).output_distribution(tokens)
    return out


@pytest.mark.parametrize("pair", P_Q)
@pytest.mark.parametrize("rule", RULES)
def test_first_token_distribution_exact(rule, pair):
    verifier, kind, k, lossless = RULES[rule]
    p, q = P_Q[pair]
    out = exact_first_token(verifier, p, q, kind, k)
    if lossless:
        torch.testing.assert_close(out, p, rtol=0, atol=1e-9)
    else:  # the same check catches the wrong rule, by a wide margin
        assert bool((out < -1e-9).any()) or total_variation(out, p) > 0.01


@pytest.mark.parametrize("k", [2, 3, 5])
def test_spectr_rho_is_the_smallest_valid(k):
    g = torch.Generator().manual_seed(k)
    for _ in range(20):
        p, q = torch.rand(8, generator=g, dtype=torch.float64) ** 3, torch.rand(8, generator=g, dtype=torch.float64)
        p, q = p / p.sum(), q / q.sum()
        rho = kseq_rho(p, q, k)

        def slack(r):  # rho beta - (1 - (1 - beta)^k) >= 0 where rho is valid
            beta = kseq_beta(p, q, torch.tensor(r, dtype=torch.float64))
            return float(r * beta - (1 - (1 - beta) ** k))

        assert 1.0 <= float(rho) <= k and slack(float(rho)) >= -1e-12
        assert float(rho) == 1.0 or slack(float(rho) - 1e-4) < 0


# ---------------------------------------------------------------------------------------------- Monte Carlo, verify()
V_MC = 4
_g = torch.Generator().manual_seed(7)
P_TABLE = torch.softmax(torch.randn(V_MC, V_MC, generator=_g) * 1.5, dim=-1)  # p(next | last token)
Q_TABLE = torch.softmax(torch.randn(V_MC, V_MC, generator=_g) * 1.5, dim=-1)  # q(next | last token)
P_TABLE[:, 3] = 0.0  # a token the (warped) target never emits
P_TABLE /= P_TABLE.sum(dim=-1, keepdim=True)
ROOT = 0
N_MC = 2000


def draw_tree(shape: str, g: torch.Generator) -> DraftTree:
    """A depth-2 draft below ROOT from Q_TABLE. chain: x1 -> x2; tree: two children of the root, two below the
    first; spectr: two i.i.d. chains (never merged); point-mass: top-2 children instead of draws."""
    def draw(last, k, replacement=True):
        return torch.multinomial(Q_TABLE[last], k, replacement, generator=g)

    if shape == "chain":
        x1 = draw(ROOT, 1)
        x2 = draw(int(x1), 1)
        return DraftTree.chain(torch.cat([x1, x2]), torch.stack([Q_TABLE[ROOT], Q_TABLE[int(x1)]]), IID)
    if shape == "spectr":
        first = draw(ROOT, 2)
        second = torch.cat([draw(int(x), 1) for x in first])
        probs = torch.stack([Q_TABLE[ROOT], Q_TABLE[ROOT], Q_TABLE[int(first[0])], Q_TABLE[int(first[1])]])
        return DraftTree(torch.cat([first, second]), torch.tensor([-1, -1, 0, 1]), probs, IID)
    kind = {"tree-iid": IID, "tree-without-replacement": WOR, "tree-point-mass": POINT}[shape]
    if kind is POINT:
        first = Q_TABLE[ROOT].topk(2).indices
        second = Q_TABLE[int(first[0])].topk(2).indices
    else:
        first = draw(ROOT, 2, kind is IID)
        second = draw(int(first[0]), 2, kind is IID)
    probs = torch.stack([Q_TABLE[ROOT]] * 2 + [Q_TABLE[int(first[0])]] * 2)
    return DraftTree(torch.cat([first, second]), torch.tensor([-1, -1, 0, 0]), probs if kind is not POINT else None,
                     kind)


MC_CASES = {
    "rejection-chain": ("rejection", "chain", True),
    "rejection-tree-iid": ("rejection", "tree-iid", True),
    "rejection-tree-without-replacement": ("rejection", "tree-without-replacement", True),
    "rejection-tree-point-mass": ("rejection", "tree-point-mass", True),
    "spectr-chain": ("spectr", "chain", True),
    "spectr-two-drafts": ("spectr", "spectr", True),
    "broken-always-accept-chain": (AlwaysAccept(), "chain", False),
    "broken-residual-is-target-tree": (ResidualIsTarget(), "tree-iid", False),
}


@pytest.mark.parametrize("case", MC_CASES)
def test_verify_two_token_distribution_monte_carlo(case):
    """Chi-square (0.1% level, seeded) of the first two emitted tokens over N_MC verify() calls against
    p(t1 | ROOT) p(t2 | t1); a step that ends after t1 is continued by a draw from p(. | t1), as the engine's next
    step would. Tables are Markov in the last token, so slot s's logits are log P_TABLE[token of s]."""
    verifier, shape, lossless = MC_CASES[case]
    verifier = create_verifier(verifier)
    g = torch.Generator().manual_seed(11)
    sampling = SamplingConfig(do_sample=True)
    counts = torch.zeros(V_MC * V_MC)
    for _ in range(N_MC):
        tree = draw_tree(shape, g)
        logits = torch.log(P_TABLE[torch.cat([torch.tensor([ROOT]), tree.tokens])])
        result = verifier.verify(tree, logits, sampling, g)
        assert result.tokens.numel() == result.num_accepted + 1
        t1 = int(result.tokens[0])
        t2 = int(result.tokens[1]) if result.tokens.numel() > 1 else int(torch.multinomial(P_TABLE[t1], 1,
                                                                                            generator=g))
        counts[t1 * V_MC + t2] += 1
    expected = (P_TABLE[ROOT][:, None] * P_TABLE).flatten()
    assert follows(counts, expected) == lossless, chi_square(counts, expected)


def test_verify_bonus_and_recovered_flags():
    """Hand-built logits (100 vs -100) make p one-hot: a right chain is fully accepted with a bonus token from the
    leaf's row; a wrong first token is rejected and recovered from the residual (= p)."""
    logits = torch.full((3, 6), -100.0)
    logits[0, 4], logits[1, 5], logits[2, 2] = 100.0, 100.0, 100.0  # p after root: 4, after 4: 5, after 5: 2
    q = torch.full((2, 6), 1 / 6)
    sampling = SamplingConfig(do_sample=True)
    for name in ("rejection", "spectr"):
        v = create_verifier(name)
        right = v.verify(DraftTree.chain(torch.tensor([4, 5]), q, IID), logits, sampling, torch.Generator())
        assert right.tokens.tolist() == [4, 5, 2] and right.accepted_nodes.tolist() == [0, 1] and right.bonus
        wrong = v.verify(DraftTree.chain(torch.tensor([3, 5]), q, IID), logits, sampling, torch.Generator())
        assert wrong.tokens.tolist() == [4] and wrong.num_accepted == 0 and not wrong.bonus
        empty = v.verify(DraftTree.empty(), logits[:1], sampling, torch.Generator())
        assert empty.tokens.tolist() == [4] and empty.bonus


def test_spectr_continues_with_every_consistent_draft():
    """Two drafts start with the same token 4; the target accepts 4 then only wants 2, which only the SECOND draft
    continues with: K-SEQ must try the children of both nodes carrying 4 and accept the path through node 1."""
    tree = DraftTree(torch.tensor([4, 4, 3, 2]), torch.tensor([-1, -1, 0, 1]), torch.full((4, 6), 1 / 6), IID)
    logits = torch.full((5, 6), -100.0)
    logits[0, 4] = logits[1, 2] = logits[2, 2] = logits[3, 0] = logits[4, 1] = 100.0
    result = create_verifier("spectr").verify(tree, logits, SamplingConfig(do_sample=True), torch.Generator())
    assert result.accepted_nodes.tolist() == [1, 3] and result.tokens.tolist() == [4, 2, 1] and result.bonus


# ---------------------------------------------------------------------------------------------- typical (lossy)
def test_typical_acceptance_is_biased():
    """p and q with two tokens below Medusa's threshold: drafts of the likely-under-q tokens 3, 4 are rejected and
    resampled from p, drafts of 0..2 always accepted, so the output leans towards q (TV 0.095 from p), while
    speculative sampling on the same p, q is exact."""
    p = torch.tensor([0.55, 0.20, 0.15, 0.06, 0.04], dtype=torch.float64)
    q = torch.tensor([0.10, 0.10, 0.10, 0.35, 0.35], dtype=torch.float64)
    threshold = float(typical_threshold(p[None], 0.09, 0.3))
    assert 0.06 < threshold < 0.09  # 0.3 exp(-H(p)) = 0.0874
    verifier = TypicalVerifier()
    out = torch.zeros_like(p)
    for x in range(5):  # acceptance is deterministic; enumerate the draft token
        logits = torch.log(p).expand(2, -1).clone()
        result = verifier.verify(DraftTree.chain(torch.tensor([x]), q[None], IID), logits,
                                 SamplingConfig(do_sample=True), torch.Generator())
        out += q[x] * (torch.nn.functional.one_hot(torch.tensor(x), 5) if result.num_accepted else p)
    assert total_variation(out, p) == pytest.approx(0.095, abs=1e-9)
    assert TypicalVerifier.lossless is False and RejectionVerifier.lossless is True
    torch.testing.assert_close(exact_first_token(RejectionVerifier(), p, q, IID, 1), p, rtol=0, atol=1e-12)


def test_typical_picks_deepest_then_most_likely_path():
    # root ─┬─ 0: 1 ── 2: 3        every node passes the threshold; both depth-2 paths tie on depth,
    #       └─ 1: 2 ── 3: 4        path 2 -> 4 has the larger sum of log p
    tree = DraftTree.from_paths([[1], [2], [1, 3], [2, 4]])
    logits = torch.full((5, 6), -100.0)
    logits[0, 1], logits[0, 2] = 0.0, 0.5  # after root: p(1) < p(2)
    logits[1, 3] = logits[2, 4] = 100.0  # after 1: token 3; after 2: token 4 (both certain)
    logits[3, 0] = logits[4, 5] = 100.0  # bonus rows
    result = TypicalVerifier().verify(tree, logits, SamplingConfig(do_sample=True), torch.Generator())
    assert result.accepted_nodes.tolist() == [1, 3] and result.tokens.tolist() == [2, 4, 5] and result.bonus
