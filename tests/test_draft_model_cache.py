"""The draft-model drafter keeps its own KV cache in step: the slots it holds are exactly what a fresh prefill of
the tokens it claims to hold (``drafter.cached``) builds, after every step and after generate() returns.
"""

from __future__ import annotations

import pytest
import torch

from regimes import REGIMES, RegimeDrafter
from specdec import SpecEngine
from specdec.drafters import create_drafter
from specdec.drafters.base import Drafter
from specdec.tree import DraftTree
from tiny_models import ARCHS, greedy_reference, tiny_model, tiny_prompt

NEW_TOKENS = 24
# draft -> its options: another tiny model (mostly rejected) or the target itself (all accepted). Both unquantized
# fp32: the cache is compared with a fresh prefill at fp32 tolerance (an int8 draft computes in bf16).
DRAFT_MODELS = {"other": lambda arch: dict(model=tiny_model(arch, seed=1), quantize=None),
                "target": lambda arch: dict(model=tiny_model(arch), quantize=None)}
SHAPES = {
    "chain": dict(mode="chain"),
    "tree": dict(mode="tree"),
    # narrow and deep: accepted paths reach past Gemma 3's sliding window while other branches sit in the cache
    "deep-tree": dict(mode="tree", depth=12, topk=2, width=2, budget=60, min_prob=0.0),
}


def assert_cache_holds(drafter, tokens: torch.Tensor) -> None:
    """``drafter.runner``'s cache equals a fresh prefill of ``tokens`` [L], the tokens the drafter claims to hold."""
    runner = drafter.runner
    assert runner.length == tokens.numel(), "draft cache length differs from the tokens it claims to hold"
    fresh = type(runner)(runner.model)  # the same forward (transformers' or the lean one), fed in one prefill
    fresh.prefill(tokens[None].to(runner.device))
    held, built = runner.kv_layers(), fresh.kv_layers()
    assert len(held) == len(built) == runner.model.config.num_hidden_layers
    for i, ((keys, values), (want_keys, want_values)) in enumerate(zip(held, built)):
        assert keys.shape == want_keys.shape, f"layer {i}"
        torch.testing.assert_close(keys, want_keys, atol=1e-5, rtol=0, msg=f"keys of layer {i}")
        torch.testing.assert_close(values, want_values, atol=1e-5, rtol=0, msg=f"values of layer {i}")


class CacheCheckingDrafter(RegimeDrafter):
    """Checks the inner draft-model drafter's cache after each of its observe() calls."""

    def __init__(self, inner, regime, reference):
        super().__init__(inner, regime, reference)
        self.checked_steps = 0

    def observe(self, state, outcome):
        super().observe(state, outcome)
        cached = self.inner.cached
        if self.regime == "natural":  # with rewritten drafts the draft model holds its own tokens, not the accepted
            assert torch.equal(cached, state.sequence[0, :cached.numel()].cpu())
        assert_cache_holds(self.inner, cached)
        self.checked_steps += 1


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("draft", DRAFT_MODELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_draft_cache_in_step_after_every_step(arch, shape, draft, regime):
    target = tiny_model(arch)
    prompt = tiny_prompt()
    reference = greedy_reference(target, prompt, NEW_TOKENS + 16)[0]
    inner = create_drafter("draft-model", target=target, **DRAFT_MODELS[draft](arch), **SHAPES[shape])
    drafter = CacheCheckingDrafter(inner, regime, reference)
    result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=NEW_TOKENS)
    assert torch.equal(result.sequences, reference[None, :prompt.shape[1] + NEW_TOKENS])
    assert drafter.checked_steps > 0  # whether the last step is observed: test_engine_follows_every_propose_...


@pytest.mark.parametrize("max_new_tokens", [NEW_TOKENS, NEW_TOKENS + 4])
@pytest.mark.parametrize("draft", DRAFT_MODELS)
@pytest.mark.parametrize("shape", ["chain", "tree"])
@pytest.mark.parametrize("arch", ARCHS)
def test_draft_cache_in_step_after_generate(arch, shape, draft, max_new_tokens):
    # With the target drafting for itself every draft is accepted, and at 28 new tokens the last step still drafts
    # more than one level deep, so the draft model has fed tree nodes that only an observe() would settle.
    target = tiny_model(arch)
    drafter = create_drafter("draft-model", target=target, **DRAFT_MODELS[draft](arch), **SHAPES[shape])
    result = SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=max_new_tokens)
    cached = drafter.cached
    assert torch.equal(cached, result.sequences[0, :cached.numel()].cpu())
    assert_cache_holds(drafter, cached)


class CallRecorder(Drafter):
    """Records the engine's calls; proposes the next 4 reference tokens (all accepted)."""

    name = "call-recorder"

    def __init__(self, target, reference: torch.Tensor):
        super().__init__(target)
        self.reference = reference
        self.calls: list[str] = []

    def begin(self, state):
        self.calls.append("begin")

    def propose(self, state):
        self.calls.append("propose")
        pos = state.sequence.shape[1] - 1
        return DraftTree.chain(self.reference[pos + 1: pos + 1 + min(4, state.remaining - 1)])

    def observe(self, state, outcome):
        self.calls.append("observe")


@pytest.mark.parametrize("max_new_tokens,steps", [(2, 1), (6, 1), (7, 2), (16, 3)])
def test_engine_follows_every_propose_with_observe(max_new_tokens, steps):
    """drafters/base.py promises the call order begin -> (propose -> observe)* for every generate() call; a drafter
    that is never told how its last proposal went keeps unverified draft state (see the test above)."""
    target = tiny_model("llama")
    reference = greedy_reference(target, tiny_prompt(), 16)[0]
    drafter = CallRecorder(target, reference)
    result = SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=max_new_tokens)
    assert result.stats.target_forwards == steps
    assert drafter.calls == ["begin"] + ["propose", "observe"] * steps


@pytest.mark.parametrize("do_sample", [False, True])
def test_auto_budget_sizes_trees_to_the_forward_costs(do_sample, monkeypatch):
    """budget="auto": flat forward costs take every candidate node, steep ones prune to a few; the engine records
    the chosen budget per step."""
    import specdec.drafters.tree_budget as tree_budget_module  # where every tree-sizing drafter gets its costs
    from specdec.budget import ForwardCosts

    target = tiny_model("llama")
    kwargs = dict(do_sample=True, generator=torch.Generator().manual_seed(0)) if do_sample else {}
    verifier = "rejection" if do_sample else "greedy"
    sizes = {}
    for name, costs in (("flat", {1: 1.0, 64: 1.0}), ("steep", {1: 1.0, 2: 1.5, 64: 64.0})):
        monkeypatch.setattr(tree_budget_module, "forward_costs",
                            lambda model, cache_dir=None, c=costs: ForwardCosts.from_mapping(c))
        drafter = create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1), mode="tree",
                                 budget="auto", max_budget=20, min_prob=0.0)
        result = SpecEngine(target, drafter, verifier).generate(tiny_prompt(), max_new_tokens=20, **kwargs)
        assert len(result.stats.tree_budgets) == result.stats.target_forwards
        assert all(0 <= b <= 20 for b in result.stats.tree_budgets)
        assert [min(s, b) for s, b in zip(result.stats.tree_sizes, result.stats.tree_budgets)] == \
            result.stats.tree_sizes
        sizes[name] = sum(result.stats.tree_sizes) / len(result.stats.tree_sizes)
    assert sizes["steep"] < sizes["flat"] and sizes["steep"] <= 2
