"""A cheaper draft model (specdec.models.draft_transforms): the Q4_K re-quantization computes what its fields say and
does not depend on the call's token count, a reduced LM head gives the full head's logits on its rows and -inf
elsewhere, the model handed in is left untouched, and speculation through every transform stays exact: greedy equal
to the target's greedy (on a gguf target too), sampling distributed as the target's (and a wrong q is caught)."""

from __future__ import annotations

import copy

import pytest
import torch

from distributions import Z_09995, chi_square, claim_uniform_q, follows
from specdec import SpecEngine
from specdec.drafters import create_drafter
from specdec.drafters.heads import DraftVocab
from specdec.errors import InvalidInputError
from specdec.kernels import W8A8Linear
from specdec.kernels.kquant_linear import Q4_K, KQuantLinear, dequantize_fields, quantize_activations, unpack_packed
from specdec.models.draft_transforms import (PaddedKQuantLinear, ReducedLMHead, cheap_draft, keep_layers,
                                             q4_k_linear, resolve_draft_vocab)
from test_gguf_weights import gguf_model
from test_sampling import V_E2E, _three_token_counts
from tiny_heads import reduced_vocab
from tiny_models import ARCHS, VOCAB, greedy_reference, tiny_model, tiny_prompt


@pytest.mark.parametrize("in_features", [64, 896, 512])
def test_q4_k_layer_encodes_its_weights_and_is_row_invariant(in_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 40, bias=True)
    layer = q4_k_linear(linear)
    padded = in_features % 256 != 0
    assert isinstance(layer, PaddedKQuantLinear) == padded and layer.format == "Q4_K"
    w = linear.weight.detach().float()
    fields = unpack_packed(layer)
    deq = dequantize_fields(fields, Q4_K)[:40]
    assert torch.equal(layer.weight, deq[:, :in_features].bfloat16())
    assert not deq[:, in_features:].any()  # the padding columns are exact zeros
    step = (w.view(40, -1, 32).amax(-1) - w.view(40, -1, 32).amin(-1).clamp(max=0)) / 15  # per 32-column sub-block
    err = (deq[:, :in_features] - w).abs().view(40, -1, 32).amax(-1)
    assert (err <= 0.6 * step + 0.02 * step.amax(-1, keepdim=True)).all()  # about half a level, plus 6-bit scales
    for n in (1, 3, 9):
        x = torch.randn(n, in_features, dtype=torch.bfloat16)
        y = layer(x)
        xp = torch.nn.functional.pad(x, (0, -in_features % 256))
        a, s = quantize_activations(xp)
        exact = (a.double().view(n, -1, 256) * s.double()[:, :, None]).view(n, -1) @ deq.double().T
        exact = exact + linear.bias.detach().double()
        assert y.shape == (n, 40) and torch.allclose(y.double(), exact, rtol=2 ** -7, atol=1e-3 * exact.abs().max())
        assert torch.equal(torch.cat([layer(x[i:i + 1]) for i in range(n)]), y), n


@pytest.mark.parametrize("kind", ["dense", "w8a8", "gguf"])
def test_reduced_head_gives_the_full_heads_rows_and_minus_inf_elsewhere(kind):
    model = gguf_model("qwen2") if kind == "gguf" else copy.deepcopy(tiny_model("qwen2", seed=1)).to(torch.bfloat16)
    if kind == "w8a8":
        model.lm_head = W8A8Linear.from_linear(model.lm_head)
    vocab = DraftVocab(torch.tensor([0, 3, 4, 10, 17, 40, VOCAB - 1]), VOCAB)
    cheap = cheap_draft(model, vocab=vocab)
    assert isinstance(cheap.lm_head, ReducedLMHead) and type(cheap.lm_head.rows) is type(model.lm_head)
    prompt = tiny_prompt()
    with torch.no_grad():
        full, reduced = model(prompt).logits, cheap(prompt).logits
    assert reduced.shape == full.shape
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[vocab.ids] = False
    assert torch.isneginf(reduced[..., outside]).all()
    if kind == "w8a8":  # the kept rows re-rounded per row from their int8 values: the same int8 values
        assert torch.equal(cheap.lm_head.rows.int8_weight(), model.lm_head.int8_weight()[vocab.ids])
    assert torch.equal(reduced[..., vocab.ids], full[..., vocab.ids])


def test_cheap_draft_leaves_the_given_model_as_it_was():
    model = copy.deepcopy(tiny_model("llama", seed=1)).to(torch.bfloat16)  # the cached model stays untouched
    prompt = tiny_prompt()
    with torch.no_grad():
        before = model(prompt).logits
    cheap = cheap_draft(model, quantize="q4_k", vocab=DraftVocab(torch.arange(0, VOCAB, 2), VOCAB), layers=1)
    assert all(type(m) is not KQuantLinear for m in model.modules()) and type(model.lm_head) is torch.nn.Linear
    assert len(model.model.layers) == model.config.num_hidden_layers > 1
    assert len(cheap.model.layers) == cheap.config.num_hidden_layers == 1
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, before)
        assert torch.isfinite(cheap(prompt).logits[..., ::2]).all()


def test_bad_options_name_the_fix():
    model = tiny_model("llama", seed=1)
    with pytest.raises(InvalidInputError, match="draft_layers must be an integer"):
        keep_layers(cheap_draft(model), 0)
    with pytest.raises(InvalidInputError, match="quantize must be"):
        cheap_draft(model, quantize="q3")
    with pytest.raises(InvalidInputError, match="draft_vocab is over 10 tokens"):
        resolve_draft_vocab(DraftVocab(torch.arange(3), 10), model)
    with pytest.raises(InvalidInputError, match="no heads with a reduced vocabulary are shipped"):
        resolve_draft_vocab("shipped", model)
    with pytest.raises(InvalidInputError, match="quantize must be None, 'int8', 'q4_k' or 'auto'"):
        create_drafter("draft-model", target=model, model=model, quantize="q4")


# --- speculation stays exact -----------------------------------------------------------------------------------------

CHEAP = {  # draft-model options beside model=...; vocab is filled in per target
    "q4_k": dict(quantize="q4_k"),
    "reduced-vocab": dict(draft_vocab="reduced"),
    "q4_k-reduced-vocab-1-layer": dict(quantize="q4_k", draft_vocab="reduced", draft_layers=1),
}


def _options(name: str, target) -> dict:
    options = dict(CHEAP[name])
    if options.get("draft_vocab") == "reduced":
        options["draft_vocab"] = reduced_vocab(target)
    return options


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CHEAP)
def test_greedy_through_a_cheap_draft_equals_the_targets_greedy_on_a_gguf_target(arch, name):
    target = gguf_model(arch)
    # any prompt, near-ties included: verification on the quantized path is batch-invariant (test_batch_invariance)
    for seed in (1, 2):
        prompt = tiny_prompt(seed=seed)
        reference = greedy_reference(target, prompt, 24)
        drafter = create_drafter("draft-model", target=target, model=gguf_model(arch, seed=1), mode="tree",
                                 min_prob=0.0, budget=12, **_options(name, target))
        result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=24, eos_token_id=None)
        assert torch.equal(result.sequences, reference), seed
        assert max(result.stats.draft_depths) >= 1


@pytest.mark.parametrize("arch", ARCHS)
def test_self_drafting_through_a_reduced_head_accepts_what_the_vocabulary_holds(arch):
    """The target drafts for itself over a reduced vocabulary: a draft token is the target's greedy token exactly
    when that token is in the vocabulary, so the output is the greedy one and some drafts are accepted whole."""
    target = tiny_model(arch)
    prompt = tiny_prompt()
    drafter = create_drafter("draft-model", target=target, model=target, quantize=None, mode="chain", depth=3,
                             min_prob=0.0, draft_vocab=reduced_vocab(target))
    result = SpecEngine(target, drafter).generate(prompt, max_new_tokens=24)
    assert torch.equal(result.sequences, greedy_reference(target, prompt, 24))
    assert max(result.stats.accepted_lengths) == 4


@pytest.mark.parametrize("broken", [False, True], ids=["true-q", "broken-uniform-q"])
def test_sampling_through_a_reduced_q4_k_draft_is_distributed_as_the_target(broken):
    """As test_sampling's end-to-end cases: (t1, t2) and (t2, t3) of 3-token answers against the target's exact
    distribution; the draft's q is zero on 3 of the 8 tokens. The broken case draws from that q but hands the
    verifier a uniform q, and the same test must reject it."""
    target = tiny_model("llama", vocab_size=V_E2E)
    drafter = create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1, vocab_size=V_E2E),
                             quantize="q4_k", draft_vocab=DraftVocab(torch.tensor([0, 2, 3, 5, 6]), V_E2E),
                             mode="tree", topk=2, width=2)
    if broken:
        claim_uniform_q(drafter, V_E2E)
    kwargs = dict(temperature=1.5, repetition_penalty=1.5)
    counts, expected = _three_token_counts(SpecEngine(target, drafter, "rejection"), target, kwargs)
    results = [follows(counts.sum(dim=dims), expected.sum(dim=dims), z=Z_09995) for dims in [(2,), (0,)]]
    assert all(results) != broken, [chi_square(counts.sum(dim=dims), expected.sum(dim=dims)) for dims in [(2,), (0,)]]
