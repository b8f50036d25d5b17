"""Greedy speculative decoding is lossless: for every registered drafter, architecture and acceptance regime the
output equals the target's own greedy output, token for token.

The regimes (see ``regimes.py``) force the draft right or wrong against the known greedy continuation, so the
all-accepted, none-accepted and rejected-in-the-middle paths of the engine all run for every drafter.
Prompt (12) + drafts reach well past Gemma 3's sliding window (6).
"""

from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch

from regimes import REGIMES, RegimeDrafter
from specdec import SpecEngine
from specdec.drafters import available_drafters, create_drafter
from specdec.drafters.base import Drafter
from specdec.drafters.aded.trigram_table import TrigramTable
from specdec.tree import DraftTree
from tiny_models import ARCHS, VOCAB, greedy_reference, tiny_model, tiny_prompt
from tiny_heads import perturbed_heads, reduced_vocab, tiny_acceptance_head

NEW_TOKENS = 28
REFERENCE_SLACK = 16  # the regime rewriter looks this far past NEW_TOKENS at most (drafts are <= 12 deep)

# drafter name -> variant -> factory(target, arch) returning the drafter's constructor options.
# A newly registered drafter must get an entry here; until then its exactness tests fail.
Factory = Callable[[torch.nn.Module, str], dict]
DRAFTER_FACTORIES: dict[str, dict[str, Factory]] = {
    # another tiny model drafts with the default options (int8 on CPU) except min_prob: the random draft model's
    # flat distributions would stop every draft at depth 1, and the regimes need deeper drafts
    "draft-model": {
        "chain": lambda target, arch: dict(model=tiny_model(arch, seed=1), mode="chain", min_prob=0.0),
        "tree": lambda target, arch: dict(model=tiny_model(arch, seed=1), mode="tree", min_prob=0.0, budget=12),
        # the target drafts for itself, unquantized: its drafts are the greedy tokens
        "self-chain": lambda target, arch: dict(model=target, mode="chain", quantize=None, min_prob=0.0),
        "deep-tree": lambda target, arch: dict(model=tiny_model(arch, seed=1), mode="tree", depth=12, topk=2, width=2,
                                               budget=60, min_prob=0.0),
        # a cheaper draft (specdec.models.draft_transforms): Q4_K layers, a reduced LM head, one layer kept
        "cheap": lambda target, arch: dict(model=tiny_model(arch, seed=1), mode="tree", min_prob=0.0, budget=12,
                                           quantize="q4_k", draft_vocab=reduced_vocab(target), draft_layers=1),
        # HF's heuristic draft length (specdec.draft_length): the chain grows and shrinks with the regime
        "hf-heuristic": lambda target, arch: dict(model=tiny_model(arch, seed=1), mode="chain", depth=8,
                                                  length_policy="hf-heuristic"),
        # SpecDec++ on a random acceptance head: stop once P(a fed token is rejected) > 0.9 (drafts 2-5 deep)
        "specdec++": lambda target, arch: dict(
            model=tiny_model(arch, seed=1), mode="chain", depth=6, length_policy="specdec++",
            acceptance_head=tiny_acceptance_head(tiny_model(arch, seed=1), target), acceptance_threshold=0.9),
    },
    "prompt-lookup": {
        "chain": lambda target, arch: {},
        "tree": lambda target, arch: dict(num_candidates=3),
        # hand-made costs: a forward over 2 tokens costs 1.1x one, 11 tokens 3x, so the length varies with the rates
        "auto-length": lambda target, arch: dict(num_tokens="auto", costs={1: 1.0, 2: 1.1, 4: 1.4, 11: 3.0}),
    },
    # hand-made costs (size -> seconds; a forward over 16 tokens costs 1.5x one): the auto budget prunes the template
    "token-recycling": {
        "template": lambda target, arch: dict(costs={1: 1.0, 16: 1.5, 64: 4.0}),
        "fixed-budget": lambda target, arch: dict(budget=20),
    },
    # an empty table drafts from the context alone (our defaults, and the reference's fixed budget); a table counted
    # on greedy continuations of this prompt and another drafts what the target says (branching trees, long accepted
    # paths), sized by hand-made costs
    "aded": {
        "context-only": lambda target, arch: {},  # the defaults: budget "auto", prompt tri-grams adapted
        "reference": lambda target, arch: dict(budget=24, adapt_prompt=False),
        "table": lambda target, arch: dict(table=TrigramTable.from_sequences(
            [greedy_reference(target, tiny_prompt(seed=s), 40)[0].tolist() for s in (0, 1)]), budget="auto",
            costs={1: 1.0, 16: 1.5, 64: 4.0}),
    },
    # the tiny targets have 2-3 layers, so skip_ratio 0.5 gives Gemma's 3 layers one skipped sub-layer to search
    # over (2 skippable); a short window lets the search run within 28 tokens; stop_threshold 0: the random
    # models' flat distributions would stop every draft at depth 1. "fixed-layers" skips any layers given.
    "swift": {
        "default": lambda target, arch: dict(skip_ratio=0.5, window=8, stop_threshold=0.0),
        "fixed-layers": lambda target, arch: dict(skip_attention=(1,), skip_mlp=(0,), stop_threshold=0.0),
    },
    # "default" rarely drafts on the tiny models (TPL prefers no draft for a 1-of-2-layer exit); "eager" drafts at
    # least 3 tokens per round
    "del": {
        "default": lambda target, arch: {},
        "eager": lambda target, arch: dict(min_draft=3, stop_threshold=0.0),
    },
    # trained-head drafters: randomly initialised heads as shipped without weights ("random-init": the identity on
    # h, a warning), perturbed heads whose every weight matters, the same over a reduced draft vocabulary, and
    # Medusa's static sparse tree from (made-up) measured accuracies. Fixed budgets (here and for draft-model's
    # tree): an "auto" budget follows measured costs, which vary with the machine's load, and the regimes need
    # drafts at least two deep; tests/test_defaults.py covers the defaults
    **{kind: {
        "random-init": lambda target, arch: dict(budget=16),
        "perturbed": lambda target, arch, kind=kind: dict(heads=perturbed_heads(kind, target), budget=16),
        "reduced-vocab": lambda target, arch, kind=kind: dict(heads=perturbed_heads(
            kind, target, draft_vocab=reduced_vocab(target)), budget=10),
    } for kind in ("medusa", "hydra", "clover", "chimera", "deer")},
}
DRAFTER_FACTORIES["deer"].update({
    "two-steps": lambda target, arch: dict(heads=perturbed_heads("deer", target, num_heads=6), steps=2, budget=6),
    "confidence-cut": lambda target, arch: dict(heads=perturbed_heads("deer", target), confidence=0.02, budget=4),
    "short-block": lambda target, arch: dict(heads=perturbed_heads("deer", target), block_size=2, budget=8),
})
DRAFTER_FACTORIES["medusa"]["static-tree"] = lambda target, arch: dict(
    heads=perturbed_heads("medusa", target).with_metadata(accuracies=[[0.6, 0.2, 0.1], [0.5, 0.2], [0.4, 0.2], [0.3]]),
    budget=10)
# Variants whose natural drafts are the target's greedy tokens: every step accepts its whole draft.
FULLY_ACCEPTED_WHEN_NATURAL = {("draft-model", "self-chain")}


def _drafter_variants() -> list:
    params = []
    for name in available_drafters():
        variants = DRAFTER_FACTORIES.get(name)
        if variants is None:
            params.append(pytest.param(name, None, id=f"{name}[NO-FACTORY]"))
            continue
        params += [pytest.param(name, variant, id=f"{name}[{variant}]") for variant in variants]
    return params


@functools.lru_cache(maxsize=None)
def _long_reference(arch: str) -> torch.Tensor:
    """LongTensor [P + NEW_TOKENS + REFERENCE_SLACK]: prompt and greedy continuation, for the regime rewriter."""
    return greedy_reference(tiny_model(arch), tiny_prompt(), NEW_TOKENS + REFERENCE_SLACK)[0]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drafter_name,variant", _drafter_variants())
def test_generate_equals_greedy(drafter_name, variant, arch, regime):
    if variant is None:
        pytest.fail(f"drafter {drafter_name!r} is registered but has no entry in DRAFTER_FACTORIES "
                    f"(tests/test_exactness.py): add a factory (target, arch) -> constructor options for a tiny "
                    f"target, so that the exactness harness covers it")
    target = tiny_model(arch)
    prompt = tiny_prompt()
    inner = create_drafter(drafter_name, target=target, **DRAFTER_FACTORIES[drafter_name][variant](target, arch))
    drafter = RegimeDrafter(inner, regime, _long_reference(arch))

    result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=NEW_TOKENS)

    assert torch.equal(result.sequences, greedy_reference(target, prompt, NEW_TOKENS))
    stats = result.stats
    assert stats.drafter == drafter_name
    assert stats.draft_forwards == inner.forward_count
    assert stats.new_tokens == NEW_TOKENS
    assert stats.target_forwards == len(stats.accepted_lengths)
    # The prefill emits the first token; no step may emit more than generate() still allows.
    assert sum(stats.accepted_lengths) == NEW_TOKENS - 1
    depths = stats.draft_depths
    if regime != "natural":  # empty proposals are replaced, so every step but a last one-token step has a draft
        assert all(d >= 1 for d in depths[:-1]), depths
        assert max(depths) >= 2, depths

    if regime == "all_right" or (regime == "natural" and (drafter_name, variant) in FULLY_ACCEPTED_WHEN_NATURAL):
        assert stats.accepted_lengths == [d + 1 for d in depths]
        assert stats.mean_accepted_length > 1
    elif regime == "all_wrong":
        assert stats.accepted_lengths == [1] * (NEW_TOKENS - 1)
    elif regime == "wrong_at_depth_2":
        assert stats.accepted_lengths == [min(d, 1) + 1 for d in depths]
        assert all(a <= 2 for a in stats.accepted_lengths) and 2 in stats.accepted_lengths


class HiddenStateProbe(Drafter):
    """Asks for the target's hidden states; proposes [right, right, wrong] below each root and records, at every
    proposal, state.target_hidden with the positions it should cover: the tokens the target's cache took in since
    the previous proposal (the prompt, then the previous root and its accepted tokens)."""

    name = "hidden-state-probe"
    needs_target_hidden_states = True

    def __init__(self, target, reference: torch.Tensor):
        super().__init__(target)
        self.reference = reference
        self.seen: list[tuple[int, int, torch.Tensor]] = []  # (first position, end position, state.target_hidden)

    def propose(self, state):
        root = state.sequence.shape[1] - 1  # position of the root == tokens in the target's cache
        self.seen.append((self.seen[-1][1] if self.seen else 0, root, state.target_hidden))
        right = self.reference[root + 1: root + 3]
        wrong = (self.reference[root + 3: root + 4] + 1) % VOCAB
        return DraftTree.chain(torch.cat([right, wrong])[:state.remaining - 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_target_hidden_states_of_committed_tokens(arch):
    target = tiny_model(arch)
    probe = HiddenStateProbe(target, _long_reference(arch))
    result = SpecEngine(target, probe).generate(tiny_prompt(), max_new_tokens=13)
    assert result.stats.accepted_lengths == [3, 3, 3, 3]
    with torch.no_grad():
        hidden = target(input_ids=result.sequences, output_hidden_states=True).hidden_states[-1][0]  # [L, d]
    assert [(start, end) for start, end, _ in probe.seen] == [(0, 12), (12, 15), (15, 18), (18, 21)]
    for start, end, seen in probe.seen:
        torch.testing.assert_close(seen, hidden[start:end], atol=1e-4, rtol=0)
