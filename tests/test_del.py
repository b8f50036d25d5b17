"""DEL: the (exit, gamma) choice by tokens per layer on hand-made acceptance rates, shadow tokens against the exits'
own drafts, and end-to-end generation (greedy exactness, seeded sampling) on a 4-layer tiny target."""

from __future__ import annotations


import pytest
import torch

from specdec import SpecEngine
from specdec.drafters import create_drafter
from specdec.drafters.layer_skip.del_exit import choose_exit
from specdec.errors import InvalidInputError
from specdec.drafters.layer_skip.runner import LayerSkipRunner, SkipPlan
from specdec.runner import CausalLMRunner
from specdec.sampling import SamplingConfig
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree
from specdec.verifiers.base import VerificationResult
from tiny_models import VOCAB, greedy_reference, tiny_model, tiny_prompt

LAYERS = 4
P = 12


def deep_llama() -> torch.nn.Module:
    """A tiny Llama like tiny_models' with 4 layers, so that there are several exits."""
    return tiny_model("llama", layers=LAYERS)


# ---------------------------------------------------------------------------------------------- TPL choice
# L = 10, exits (2, 5), gamma <= 4. TPL = N / (gamma (E + h) + (L + h)(1 + g gamma)), N = sum_{i<=gamma} a^i.
#   h = 0, g = 0:  E=2, a=.80: gamma 0..4 -> .100 .150 .174 .185 .187   E=5, a=.95: .100 .130 .143 .148 .151
#   h = 5, g = 0:  E=2, a=.80: .067 .082 .084 .082 .078                 E=5, a=.95: .067 .078 .082 .082 .082
#   h = 0, g = 0:  E=2, a=.30: .100 .108 .099 .089 .079                 E=5, a=.20: .100 .080 .062 .050 .042
@pytest.mark.parametrize("acceptance,head_cost,expected", [
    ((0.8, 0.95), 0.0, (2, 4)),  # cheap low exit, long draft
    ((0.8, 0.95), 5.0, (2, 2)),  # an LM head worth 5 layers per draft token shortens the draft
    ((0.3, 0.2), 0.0, (2, 1)),
    ((0.0, 0.0), 0.0, (2, 0)),  # nothing is ever accepted: do not draft (ties go to the first exit)
    ((1.0, 1.0), 0.0, (2, 4)),  # a = 1 (N = gamma + 1, no division by 1 - a): the cheapest exit, longest draft
])
def test_tokens_per_layer_choice(acceptance, head_cost, expected):
    choice = choose_exit(torch.tensor(acceptance), torch.tensor([2, 5]), 10, head_cost, 4, 0.0)
    assert (choice.exit_layer, choice.gamma) == expected


def test_verification_growth_and_min_draft():
    # g = 0.5: every verified token adds half a forward (L = 10): E=2, a=.8 -> gamma 1: 1.8/17 = .106 beats
    # gamma 2: 2.44/24 = .102 and gamma 0: .100
    choice = choose_exit(torch.tensor([0.8]), torch.tensor([2]), 10, 0.0, 4, 0.5)
    assert (choice.exit_layer, choice.gamma) == (2, 1)
    assert choice.tokens_per_layer == pytest.approx(1.8 / 17)
    forced = choose_exit(torch.tensor([0.0]), torch.tensor([2]), 10, 0.0, 4, 0.0, min_draft=3)
    assert forced.gamma == 3


# ---------------------------------------------------------------------------------------------- shadow tokens
def test_shadow_tokens_are_what_each_exit_would_have_drafted():
    """The EMA update uses exit E's argmax at the verified positions; computed here from draft passes instead."""
    model = deep_llama()
    drafter = create_drafter("del", target=model, exits=(1, 2, 3), decay=0.5, prior_acceptance=0.5,
                             shadow_positions=3)
    target = CausalLMRunner(model)
    target.prefill(tiny_prompt())
    skip = LayerSkipRunner(model)
    root = torch.tensor([7])

    def exit_argmax(exit_layer: int, tokens: torch.Tensor) -> torch.Tensor:  # [n] argmax after each token
        positions = torch.arange(P, P + tokens.numel())
        kv = skip.new_kv(target, prefix_len=P)  # the prompt: the verification forward below appends to the cache
        return skip.forward(SkipPlan(exit_layer=exit_layer), tokens, positions, kv).argmax(-1)

    # exit 2's own greedy chain below the root: t0, t1, t2; the draft [t0, t1, x] has its first two accepted and
    # "the target" says t2 next, so exit 2 hits all three verified positions
    chain = root
    for _ in range(3):
        chain = torch.cat([root, exit_argmax(2, chain)])
    t = chain[1:]
    tree = DraftTree.chain(torch.cat([t[:2], torch.tensor([(int(t[2]) + 1) % VOCAB])]))
    out = target.forward(torch.cat([root, tree.tokens]), tree.slot_positions(P), tree.ancestors, True)
    result = VerificationResult(torch.tensor([0, 1]), t, bonus=False)
    state = DecodeState(torch.cat([tiny_prompt()[0], root, t])[None], P, target, SamplingConfig())
    drafter.observe(state, StepOutcome(tree, result, out.logits, t, out.hidden_states))

    fed = torch.cat([root, t[:2]])
    hits = torch.tensor([float((exit_argmax(e, fed) == t).double().mean()) for e in (1, 2, 3)], dtype=torch.float64)
    assert float(hits[1]) == 1.0
    torch.testing.assert_close(drafter.acceptance, 0.25 + 0.5 * hits)
    assert drafter.shadow_seconds > 0


@pytest.mark.parametrize("interval,probes", [(3, 4), (1, 12)])
def test_shadow_tokens_only_every_probe_interval_steps_while_not_drafting(interval, probes):
    target = deep_llama()
    # an LM head worth a million layers: no draft ever pays, so every step is idle
    drafter = create_drafter("del", target=target, head_cost=1e6, probe_interval=interval)
    calls = []
    head = drafter.runner.head
    drafter.runner.head = lambda states: calls.append(states.shape) or head(states)
    result = SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=13, eos_token_id=None)
    assert max(result.stats.draft_depths) == 0 and result.stats.target_forwards == 12
    assert len(calls) == probes  # steps 3, 6, 9, 12 (interval 3) or all 12


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("options", [{}, dict(min_draft=2, stop_threshold=0.0)], ids=["default", "eager"])
def test_generation_equals_greedy(options):
    target = deep_llama()
    drafter = create_drafter("del", target=target, **options)
    assert drafter.exits.tolist() == [2]  # default exits: every 2nd layer from L // 2 to L - 1
    result = SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=24)
    assert torch.equal(result.sequences, greedy_reference(target, tiny_prompt(), 24))
    assert result.stats.draft_forwards == drafter.forward_count == sum(result.stats.draft_depths)
    assert not torch.equal(drafter.acceptance, torch.full((1,), 0.5, dtype=torch.float64))  # shadow tokens seen
    if options:
        assert min(result.stats.draft_depths[:-1]) >= 2
    info = result.stats.drafter_info
    assert info["exits"] == [2] and info["acceptance"] == pytest.approx(drafter.acceptance.tolist(), abs=1e-4)
    assert sum(info["drafting_rounds_by_exit"].values()) == sum(1 for d in result.stats.draft_depths if d > 0)


def test_sampling_with_rejection_is_seeded_deterministic():
    target = deep_llama()
    outputs = []
    for _ in range(2):
        drafter = create_drafter("del", target=target, min_draft=2, stop_threshold=0.0)
        engine = SpecEngine(target, drafter, verifier="rejection")
        result = engine.generate(tiny_prompt(), max_new_tokens=16, do_sample=True,
                                 generator=torch.Generator().manual_seed(3))
        assert result.stats.new_tokens == 16 and max(result.stats.draft_depths) >= 2
        outputs.append(result.sequences)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("options,message", [
    (dict(exits=(0,)), "exits must be distinct layers in \\[1, 1\\]"),
    (dict(exits=(2,)), "exits must be distinct layers in \\[1, 1\\]"),
    (dict(min_draft=9), "min_draft must be in \\[0, max_draft=8\\]"),
    (dict(decay=1.0), "decay must be in \\[0, 1\\)"),
])
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(InvalidInputError, match=message):
        create_drafter("del", target=tiny_model("llama"), **options)
