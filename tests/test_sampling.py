"""Speculative sampling is lossless: with do_sample=True every lossless verifier emits tokens distributed exactly as
the target's own warped sampling, and each check below fails for a deliberately wrong rule.

  warpers      the logits processors equal HF's (TemperatureLogitsWarper, TopK, TopP, MinP, RepetitionPenalty)
  exact        one node's rule (its ``trial``: acceptance probabilities + residual) over every possible draft,
               enumerated with its probability: the first emitted token is distributed as p, to 1e-9
  monte carlo  verify() on depth-2 trees drawn from known Markov tables q, against known tables p: chi-square test
               on the first two emitted tokens
  typical      Medusa typical acceptance is measurably biased (it is documented as lossy)
  end to end   SpecEngine with the draft-model drafter against the exact 3-token distribution that HF's processors
               give the tiny target, and the same for the trained-head drafters (medusa, hydra, clover), which
               fails for heads that misreport q; greedy with repetition_penalty equals HF greedy
  determinism  a seeded generator reproduces the output; the global RNG is never touched
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from distributions import (Z_09995, chi_square, claim_uniform_q, follows, iid_drafts, total_variation,
                           without_replacement_drafts)
from specdec import InvalidInputError, SpecEngine
from specdec.budget import ForwardCosts
from specdec.drafters import create_drafter
from specdec.drafters.base import Drafter
from specdec.drafters.heads import DraftVocab
from specdec.runner import CausalLMRunner
from specdec.sampling import (SamplingConfig, apply_repetition_penalty, seen_mask, tree_seen_mask, warp_logits,
                              warped_probs)
from specdec.tree import DraftTree, ProposalKind
from specdec.verifiers import available_verifiers, create_verifier
from specdec.verifiers.rejection import RejectionVerifier, SiblingTrial, iid_trial, normalize
from specdec.verifiers.spectr import SpecTrVerifier, kseq_beta, kseq_rho
from specdec.verifiers.typical import TypicalVerifier, typical_threshold
from tiny_heads import perturbed_heads
from tiny_models import ARCHS, tiny_model, tiny_prompt

IID, WOR, POINT = ProposalKind.IID, ProposalKind.WITHOUT_REPLACEMENT, ProposalKind.POINT_MASS


def hf_processors(temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0):
    """The processors HF generate(do_sample=True) builds, in its order (generation/utils.py _get_logits_processor)."""
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p is not None:
        procs.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    return procs


# ---------------------------------------------------------------------------------------------- warpers
WARPINGS = {
    "temperature-0.7": dict(temperature=0.7),
    "temperature-1.5": dict(temperature=1.5),
    "top-k-1": dict(top_k=1),
    "top-k-7": dict(top_k=7),
    "top-k-above-vocab": dict(top_k=500),
    "top-p-0.3": dict(top_p=0.3),
    "top-p-0.9": dict(top_p=0.9),
    "top-p-tiny": dict(top_p=1e-6),  # keeps only the top token
    "min-p-0.1": dict(min_p=0.1),
    "min-p-1": dict(min_p=1.0),
    "all": dict(temperature=1.3, top_k=20, top_p=0.8, min_p=0.05),
}


@pytest.mark.parametrize("kwargs", WARPINGS.values(), ids=WARPINGS.keys())
def test_warpers_equal_hf(kwargs):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[0, :10] = 2.0  # ties at the top-k / top-p boundaries
    logits[1, 5] = -torch.inf  # an already-filtered token
    input_ids = torch.zeros(6, 1, dtype=torch.long)
    expected = hf_processors(**kwargs)(input_ids, logits.clone())
    got = warp_logits(logits, SamplingConfig(do_sample=True, **kwargs))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_hf(penalty):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=g) * 3
    input_ids = torch.randint(0, 40, (5, 12), generator=g)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    seen = seen_mask(torch.zeros(0, dtype=torch.long), 40, paths=input_ids)  # one row per sequence
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), expected, rtol=0, atol=0)


def test_tree_seen_mask_is_sequence_plus_slot_path():
    """Slot s penalises the sequence and the tokens of s and its ancestors: HF's processor on each slot's context."""
    tree = DraftTree.from_paths([[5], [6], [5, 7], [5, 8], [5, 7, 9]])  # nodes 5, 6, 7(5), 8(5), 9(7)
    sequence = torch.tensor([3, 4, 4, 1])
    contexts = [[], [5], [6], [5, 7], [5, 8], [5, 7, 9]]  # draft path of slot 0 (root), 1..5 (nodes)
    seen = tree_seen_mask(sequence, tree, 12)
    logits = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    got = apply_repetition_penalty(logits, seen, 1.5)
    for s, path in enumerate(contexts):
        ids = torch.cat([sequence, torch.tensor(path, dtype=torch.long)])[None]
        expected = RepetitionPenaltyLogitsProcessor(1.5)(ids, logits[s:s + 1].clone())
        torch.testing.assert_close(got[s:s + 1], expected, rtol=0, atol=0)


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


# ---------------------------------------------------------------------------------------------- end to end
V_E2E = 8
E2E_SAMPLES = 1500
# verifier, draft-model options, sampling arguments. Point-mass ("topk") drafts are lossless whatever q is, so the
# Monte Carlo test above covers them; these cases check that the drafter's q and the target's p are warped alike.
E2E_CASES = {
    "rejection-chain-top-k-top-p": ("rejection", dict(mode="chain"), dict(temperature=1.5, top_k=6, top_p=0.95)),
    "rejection-tree-without-replacement": ("rejection", dict(mode="tree", topk=3),
                                           dict(temperature=1.5, min_p=0.1, repetition_penalty=1.5)),
    "spectr-tree-iid": ("spectr", dict(mode="tree", topk=3, sample_tree="iid"),
                        dict(temperature=1.5, repetition_penalty=0.8)),
}


def exact_three_tokens(target, prompt: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """DoubleTensor [V, V, V]: P(t1, t2, t3) of HF sampling: each step's logits through hf_processors, softmax."""
    procs = hf_processors(**kwargs)
    v = V_E2E
    joint = torch.ones(1, dtype=torch.float64)
    contexts = prompt  # [B, L]: every continuation so far
    for _ in range(3):
        with torch.no_grad():
            logits = target(input_ids=contexts).logits[:, -1].float()
        probs = procs(contexts, logits).softmax(dim=-1).double()  # [B, V]
        joint = (joint[:, None] * probs).flatten()
        contexts = torch.cat([contexts.repeat_interleave(v, 0), torch.arange(v).repeat(contexts.shape[0])[:, None]], 1)
    return joint.reshape(v, v, v)


def _three_token_counts(engine: SpecEngine, target, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(observed counts [V, V, V] of E2E_SAMPLES sampled 3-token answers, their exact distribution [V, V, V])."""
    prompt = torch.tensor([[3, 5, 4, 7, 3, 6]])
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(V_E2E, V_E2E, V_E2E)
    for _ in range(E2E_SAMPLES):
        t1, t2, t3 = engine.generate(prompt, max_new_tokens=3, eos_token_id=None, do_sample=True, generator=g,
                                     **kwargs).new_tokens[0].tolist()
        counts[t1, t2, t3] += 1
    return counts, exact_three_tokens(target, prompt, kwargs)


@pytest.mark.parametrize("case", E2E_CASES)
def test_generate_three_token_distribution(case):
    """The first three tokens of SpecEngine.generate(max_new_tokens=3) over E2E_SAMPLES seeded runs: t1 is sampled
    after the prefill, t2 and t3 come from speculation (a depth-1 draft: accepted + bonus, or recovered + one more
    step). Two chi-square tests, on the 64 cells of (t1, t2) and of (t2, t3) (cells expected below 5 pooled), each
    at the 0.05% level (0.1% together), against the exact distribution that HF's processors give the tiny target
    at temperature 1.5 (V = 8)."""
    verifier, options, kwargs = E2E_CASES[case]
    target = tiny_model("llama", vocab_size=V_E2E)
    drafter = create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1, vocab_size=V_E2E),
                             quantize=None, **options)
    counts, expected = _three_token_counts(SpecEngine(target, drafter, verifier), target, kwargs)
    for dims in [(2,), (0,)]:  # (t1, t2), then (t2, t3)
        observed, probs = counts.sum(dim=dims), expected.sum(dim=dims)
        assert follows(observed, probs, z=Z_09995), (dims, chi_square(observed, probs))


# Trained-head drafters (medusa, hydra, clover, chimera) with perturbed heads (q far from p), one over a reduced draft
# vocabulary (q is zero on 3 of the 8 tokens), each checked like E2E_CASES; the broken case draws from q but hands
# the verifier a uniform q, and the same test must reject it.
HEADS_E2E_CASES = {
    "medusa-rejection-tree": ("medusa", "rejection", dict(topk=3), dict(temperature=1.5, top_k=6), False),
    "hydra-rejection-reduced-vocab": ("hydra", "rejection", dict(topk=2, width=2), dict(temperature=1.5,
                                                                                         repetition_penalty=1.5), True),
    "clover-spectr-iid": ("clover", "spectr", dict(topk=3, sample_tree="iid"), dict(temperature=1.5, top_p=0.9),
                          False),
    "chimera-rejection-tree": ("chimera", "rejection", dict(topk=2, width=2), dict(temperature=1.5, top_p=0.95),
                               False),
    "broken-uniform-q": ("hydra", "rejection", dict(topk=1), dict(temperature=1.5), False),
    "broken-chimera-uniform-q": ("chimera", "rejection", dict(topk=2), dict(temperature=1.5), False),
}


@pytest.mark.parametrize("case", HEADS_E2E_CASES)
def test_heads_drafters_three_token_distribution(case):
    kind, verifier, options, kwargs, reduced = HEADS_E2E_CASES[case]
    target = tiny_model("llama", vocab_size=V_E2E)
    vocab = DraftVocab(torch.tensor([0, 2, 3, 5, 6]), V_E2E) if reduced else None
    drafter = create_drafter(kind, target=target, heads=perturbed_heads(kind, target, draft_vocab=vocab, scale=3.0),
                             **options)
    if case.startswith("broken"):
        claim_uniform_q(drafter, V_E2E)
    counts, expected = _three_token_counts(SpecEngine(target, drafter, verifier), target, kwargs)
    results = [follows(counts.sum(dim=dims), expected.sum(dim=dims), z=Z_09995) for dims in [(2,), (0,)]]
    assert all(results) != case.startswith("broken"), [chi_square(counts.sum(dim=dims), expected.sum(dim=dims))
                                                       for dims in [(2,), (0,)]]


def test_self_drafting_accepts_every_token():
    """With the target drafting for itself q == p after the same processors, so min(1, p/q) = 1 everywhere: every
    sampled chain is accepted whole (a processor applied to one side only would reject some)."""
    target = tiny_model("llama")
    drafter = create_drafter("draft-model", target=target, model=target, quantize=None, mode="chain", depth=4)
    result = SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=21, do_sample=True, temperature=0.9, top_k=30, top_p=0.9, min_p=0.02,
        repetition_penalty=1.4, generator=torch.Generator().manual_seed(0), eos_token_id=None)
    assert result.stats.accepted_lengths == [5] * 4


GREEDY_DRAFTERS = {
    "draft-model-chain": lambda arch: ("draft-model", dict(model=tiny_model(arch, seed=1), mode="chain")),
    "draft-model-tree": lambda arch: ("draft-model", dict(model=tiny_model(arch, seed=1), mode="tree")),
    "prompt-lookup": lambda arch: ("prompt-lookup", dict(num_candidates=3)),
}


@pytest.mark.parametrize("penalty", [1.3, 0.8])
@pytest.mark.parametrize("drafter", GREEDY_DRAFTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_repetition_penalty_equals_hf(arch, drafter, penalty):
    target = tiny_model(arch)
    prompt = tiny_prompt()
    name, options = GREEDY_DRAFTERS[drafter](arch)
    result = SpecEngine(target, create_drafter(name, target=target, **options)).generate(
        prompt, max_new_tokens=20, repetition_penalty=penalty)
    expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                               repetition_penalty=penalty, pad_token_id=2)
    assert torch.equal(result.sequences, expected)


class Watched(Drafter):
    """Wraps a draft-model drafter: records its trees, checks their draft distributions and, after every observe(),
    that its cache equals a fresh prefill of the tokens it claims to hold."""

    name = "draft-model"

    def __init__(self, inner):
        super().__init__(inner.target_model)
        self.inner = inner
        self.trees: list[DraftTree] = []

    @property
    def forward_count(self):
        return self.inner.forward_count

    @forward_count.setter
    def forward_count(self, value):  # Drafter.__init__ sets it
        pass

    def begin(self, state):
        self.inner.begin(state)

    def propose(self, state):
        tree = self.inner.propose(state)
        self.trees.append(tree)
        if tree.size:
            assert tree.draft_probs is not None and tree.draft_probs.shape == (tree.size, self.inner.runner.vocab_size)
            torch.testing.assert_close(tree.draft_probs.sum(-1), torch.ones(tree.size))
            assert bool((tree.draft_probs[torch.arange(tree.size), tree.tokens] > 0).all())
            if tree.proposal is WOR:  # siblings are distinct
                pairs = (tree.parents[:, None] == tree.parents[None, :]) & (tree.tokens[:, None] == tree.tokens)
                assert torch.equal(pairs, torch.eye(tree.size, dtype=torch.bool))
        return tree

    def observe(self, state, outcome):
        self.inner.observe(state, outcome)
        cached = self.inner.cached
        assert torch.equal(cached, state.sequence[0, :cached.numel()].cpu())
        fresh = CausalLMRunner(self.inner.runner.model)
        fresh.prefill(cached[None])
        for got, want in zip(self.inner.runner.cache.layers, fresh.cache.layers):
            torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [dict(mode="chain"), dict(mode="tree", budget=12),
                                     dict(mode="tree", sample_tree="iid", budget=12),
                                     dict(mode="tree", depth=10, topk=2, width=2, budget=30)],
                         ids=["chain", "tree-without-replacement", "tree-iid", "deep-tree"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_drafts_keep_the_draft_cache_in_step(arch, options):
    """Sampled trees carry q for every node (rows sum to 1, each token has q > 0, no repeated sibling without
    replacement), and the draft cache stays in step through accepted and rejected sampled drafts, with the target
    drafting for itself (long accepted paths, past Gemma 3's sliding window)."""
    target = tiny_model(arch)
    drafter = Watched(create_drafter("draft-model", target=target, model=target, quantize=None, **options))
    result = SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=24, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(0),
        eos_token_id=None)
    assert result.stats.new_tokens == 24
    assert max(result.stats.accepted_lengths) >= 3


@pytest.mark.parametrize("arch", ARCHS)
def test_an_empty_auto_sized_draft_leaves_the_draft_cache_in_step(arch):
    """Forward costs so steep that budget="auto" keeps no node: the pool the draft model already read must leave
    its cache at once (a sampled tree drafts more than one level before the budget is chosen)."""
    target = tiny_model(arch)
    drafter = Watched(create_drafter("draft-model", target=target, model=target, quantize=None, budget="auto"))
    drafter.inner.budget_policy.costs = ForwardCosts((1, 2), (1.0, 3.0))  # a second token costs twice the first
    result = SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=12, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(0),
        eos_token_id=None)
    assert result.stats.new_tokens == 12 and set(result.stats.tree_sizes) == {0}
    assert drafter.inner.forward_count > len(result.stats.tree_sizes)  # it did read pools it then dropped


@pytest.mark.parametrize("new_tokens", range(8, 16))
def test_a_last_step_without_draft_leaves_the_draft_cache_in_step(new_tokens):
    """The last step of a generation may allow no draft at all (one token left): the draft model reads nothing
    then, and its cache must stay as the previous, accepted step left it."""
    target = tiny_model("llama")
    drafter = Watched(create_drafter("draft-model", target=target, model=target, quantize=None, budget="auto"))
    drafter.inner.budget_policy.costs = ForwardCosts((1, 64), (1.0, 1.0))  # flat: every node pays, long accepted paths
    result = SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=new_tokens, do_sample=True, temperature=0.8,
        generator=torch.Generator().manual_seed(new_tokens), eos_token_id=None)
    assert result.stats.new_tokens == new_tokens


def test_sampled_tree_keeps_whole_sibling_groups():
    """Children are verified as draws from q, so the budget never drops a child for its token: every node with
    children in the tree has all topk of them, except the last group taken, which is cut by draw rank."""
    target = tiny_model("llama")
    drafter = Watched(create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1), quantize=None,
                                     mode="tree", topk=3, width=3, budget=10, sample_tree="iid"))
    SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=12, do_sample=True, generator=torch.Generator().manual_seed(1),
        eos_token_id=None)
    assert any(tree.max_depth >= 2 for tree in drafter.trees)
    for tree in drafter.trees:
        if tree.size:
            assert tree.proposal is IID and tree.size <= 10
            sizes = torch.bincount(tree.parents + 1)
            sizes = sizes[sizes > 0]
            assert int((sizes != 3).sum()) <= 1 and int(sizes.min()) >= 1, sizes


def test_sampled_heads_tree_keeps_whole_sibling_groups():
    """The same for a trained-head drafter (the shared sampled pool), with several nodes expanded per level."""
    target = tiny_model("llama")
    drafter = create_drafter("hydra", target=target, heads=perturbed_heads("hydra", target), topk=3, width=3,
                             budget=10, sample_tree="iid")
    trees = []
    propose = drafter.propose
    drafter.propose = lambda state: trees.append(propose(state)) or trees[-1]
    SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=12, do_sample=True, generator=torch.Generator().manual_seed(1),
        eos_token_id=None)
    assert any(tree.max_depth >= 2 for tree in trees)
    for tree in trees:
        if tree.size:
            sizes = torch.bincount(tree.parents + 1)
            sizes = sizes[sizes > 0]
            assert tree.size <= 10 and int((sizes != 3).sum()) <= 1, sizes


# ---------------------------------------------------------------------------------------------- determinism, errors
# Fixed budgets: an "auto" budget follows measured timings, so the tree (and with it the random draws) may differ
# between two runs with the same seed.
@pytest.mark.parametrize("verifier,options", [
    ("rejection", dict(mode="tree", budget=12)), ("rejection", dict(mode="chain")),
    ("spectr", dict(mode="tree", sample_tree="iid", budget=12)),
    ("typical", dict(mode="tree", sample_tree="topk", budget=12))])
def test_deterministic_when_seeded(verifier, options):
    target = tiny_model("llama")
    drafter = create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1), **options)
    engine = SpecEngine(target, drafter, verifier)
    rng_before = torch.get_rng_state()

    def run(seed):
        return engine.generate(tiny_prompt(), max_new_tokens=16, do_sample=True, temperature=1.2, top_p=0.95,
                               generator=torch.Generator().manual_seed(seed), eos_token_id=None).sequences

    first = run(0)
    assert torch.equal(run(0), first)
    assert any(not torch.equal(run(seed), first) for seed in (1, 2, 3))
    engine.generate(tiny_prompt(), max_new_tokens=4, do_sample=True, eos_token_id=None)  # no generator: fresh seed
    assert torch.equal(torch.get_rng_state(), rng_before), "generate() touched the global RNG"


def test_sampling_verifiers_are_registered():
    assert {"greedy", "rejection", "spectr", "typical"} <= set(available_verifiers())
    for name in ("rejection", "spectr", "typical"):
        assert create_verifier(name).samples
    target = tiny_model("llama")
    result = SpecEngine(target, create_drafter("prompt-lookup", target=target), "typical").generate(
        tiny_prompt(), max_new_tokens=4, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert result.stats.lossless is False and result.stats.verifier == "typical"


@pytest.mark.parametrize("verifier,kwargs,phrase", [
    ("greedy", dict(do_sample=True), "do_sample=True needs a sampling verifier; 'greedy' decodes greedily"),
    ("rejection", {}, "verifier 'rejection' samples; pass do_sample=True or use 'greedy'"),
    ("spectr", {}, "verifier 'spectr' samples; pass do_sample=True"),
    ("rejection", dict(do_sample=True, temperature=0.0), "temperature must be > 0 when do_sample=True, got 0.0"),
    ("rejection", dict(do_sample=True, temperature=-0.5), "temperature must be > 0 when do_sample=True, got -0.5"),
    ("rejection", dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
    ("rejection", dict(do_sample=True, top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    ("rejection", dict(do_sample=True, top_p=1.01), "top_p must be in (0, 1], got 1.01"),
    ("rejection", dict(do_sample=True, top_k=2.5), "top_k must be a non-negative integer, got 2.5"),
    ("rejection", dict(do_sample=True, min_p=-0.1), "min_p must be in [0, 1], got -0.1"),
    ("rejection", dict(do_sample=True, repetition_penalty=-1.0), "repetition_penalty must be > 0, got -1.0"),
])
def test_sampling_arguments_rejected(verifier, kwargs, phrase):
    target = tiny_model("llama")
    engine = SpecEngine(target, create_drafter("prompt-lookup", target=target), verifier)
    with pytest.raises(InvalidInputError, match=re.escape(phrase)):
        engine.generate(tiny_prompt(), max_new_tokens=4, **kwargs)


def test_unknown_sample_tree_rejected():
    target = tiny_model("llama")
    with pytest.raises(InvalidInputError, match=re.escape("sample_tree must be one of 'without_replacement', 'iid', "
                                                          "'topk', got 'beam'")):
        create_drafter("draft-model", target=target, model=target, sample_tree="beam")


def test_first_token_is_sampled_from_warped_target():
    """The token after the prefill is drawn from the warped target distribution (top_k=2: only the two most likely
    tokens ever appear, both of them do)."""
    target = tiny_model("llama")
    engine = SpecEngine(target, create_drafter("prompt-lookup", target=target), "rejection")
    g = torch.Generator().manual_seed(0)
    firsts = {int(engine.generate(tiny_prompt(), max_new_tokens=1, do_sample=True, top_k=2, temperature=3.0,
                                  generator=g, eos_token_id=None).new_tokens[0, 0]) for _ in range(40)}
    with torch.no_grad():
        top2 = set(target(tiny_prompt()).logits[0, -1].topk(2).indices.tolist())
    assert firsts == top2
    assert warped_probs(torch.tensor([[0.0, 1.0, 2.0]]), SamplingConfig(do_sample=True, top_k=2))[0, 0] == 0
