"""The llama-cpp benchmark baselines against a stand-in ``llama_cpp`` module (the real one is an optional extra that
builds from source): what is passed to llama.cpp, where decoding stops, and how the report compares with it."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from specdec.benchmarks import prompts as P
from specdec.benchmarks.llama_cpp import LlamaCppGenerate
from specdec.benchmarks.methods import HFGenerate, Sampling, build_method
from specdec.benchmarks.report import format_table
from specdec.benchmarks.run import run_benchmark, summarize
from specdec.errors import InvalidInputError
from tiny_models import VOCAB, tiny_model


class FakeLlama:
    """Records the constructor arguments and every call; ``generate`` yields ``script`` after reading the prompt."""

    instances: list["FakeLlama"] = []
    script: list[int] = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.resets, self.seeds = kwargs, [], 0, []
        FakeLlama.instances.append(self)

    def reset(self):
        self.resets += 1

    def set_seed(self, seed):
        self.seeds.append(seed)

    def generate(self, tokens, **options):
        self.calls.append((list(tokens), options))
        yield from FakeLlama.script
        raise AssertionError("the caller must stop at EOS or max_new_tokens")


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    module = types.ModuleType("llama_cpp")
    module.Llama = FakeLlama
    speculative = types.ModuleType("llama_cpp.llama_speculative")
    speculative.LlamaPromptLookupDecoding = lambda num_pred_tokens: ("lookup", num_pred_tokens)
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", speculative)
    FakeLlama.instances = []
    return FakeLlama


def test_greedy_run_feeds_the_same_ids_and_stops_at_eos_or_the_budget(fake_llama_cpp):
    method = LlamaCppGenerate("llama-cpp", "/models/x.gguf", threads=2)
    ids = torch.tensor([[5, 6, 7]])
    fake_llama_cpp.script = [11, 12, 2, 13]
    run = method.generate(ids, 10, eos_token_id=[2, 3])
    assert run.new_tokens.tolist() == [11, 12, 2]  # EOS included, as HF generate returns it
    fake_llama_cpp.script = [11, 12, 14, 15]
    assert method.generate(ids, 3, eos_token_id=2).new_tokens.tolist() == [11, 12, 14]
    (llm,) = fake_llama_cpp.instances  # one model for every call
    assert llm.kwargs["model_path"] == "/models/x.gguf" and llm.kwargs["n_threads"] == 2
    assert llm.kwargs["n_threads_batch"] == 2 and llm.kwargs["draft_model"] is None
    tokens, options = llm.calls[0]
    assert tokens == [5, 6, 7] and options["top_k"] == 1 and options["temp"] == 0.0
    assert options["min_p"] == 0.0 and options["repeat_penalty"] == 1.0  # llama.cpp's own defaults are not "off"
    assert llm.resets == 2 and not llm.seeds  # a fresh cache per call; greedy draws no random numbers


def test_sampling_and_prompt_lookup_options_reach_llama_cpp(fake_llama_cpp):
    method = LlamaCppGenerate("llama-cpp-prompt-lookup", "m.gguf", 2, Sampling(True, 0.7, None, 0.9), prompt_lookup=10)
    fake_llama_cpp.script = [4]
    method.generate(torch.tensor([[5]]), 1, eos_token_id=None, seed=9)
    (llm,) = fake_llama_cpp.instances
    assert llm.kwargs["draft_model"] == ("lookup", 10) and llm.kwargs["logits_all"]
    assert llm.seeds == [9]
    options = llm.calls[0][1]
    assert options["temp"] == 0.7 and options["top_k"] == 0 and options["top_p"] == 0.9


def test_prompt_over_the_context_and_batches_are_clear_errors(fake_llama_cpp):
    method = LlamaCppGenerate("llama-cpp", "m.gguf", 2, context=16)
    with pytest.raises(InvalidInputError, match="exceed the llama-cpp context of 16"):
        method.generate(torch.ones(1, 10, dtype=torch.long), 8, None)
    with pytest.raises(InvalidInputError, match="batch size 1"):
        method.generate(torch.ones(2, 3, dtype=torch.long), 8, None)


def test_missing_extra_and_missing_gguf_name_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(InvalidInputError, match=r"specdec\[llamacpp\]"):
        LlamaCppGenerate("llama-cpp", "m.gguf", 2).generate(torch.tensor([[1]]), 1, None)
    with pytest.raises(InvalidInputError, match="registered model"):
        build_method({"name": "llama-cpp", "baseline": "llama-cpp"}, tiny_model("llama"))


def test_report_compares_with_llama_cpp_without_a_tie_analysis(fake_llama_cpp):
    target = tiny_model("llama")
    prompts = [P.Prompt(str(i), "qa", "x") for i in range(2)]
    encode = lambda p: torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(int(p.id)))  # noqa
    plain = HFGenerate("plain", target)
    reference = [plain.generate(encode(p), 5, None).new_tokens.tolist() for p in prompts]
    fake_llama_cpp.script = reference[0]  # agrees on the first prompt only
    llama = build_method({"name": "llama-cpp", "baseline": "llama-cpp"}, target, gguf="m.gguf", threads=1)
    results = run_benchmark([plain, llama], prompts, encode, 5, None, target=target, progress=False)
    assert "llama-cpp" not in results[0].divergence
    diverged = results[1].divergence["llama-cpp"]
    assert diverged["kind"] == "own-numerics" and "logit_gap" not in diverged  # no near-tie claim either way
    summary = summarize(results, assisted=None, llama_cpp="llama-cpp")
    assert summary["llama-cpp"]["identical"] == 1 and summary["llama-cpp"]["own_numerics"]
    assert summary["plain"]["speedup_vs_llama-cpp"] > 0 and summary["llama-cpp"]["speedup_vs_llama-cpp"] == 1.0
    table = format_table(summary)
    assert "vs llama.cpp" in table and "n/a (own numerics)" in table
    assert "vs llama.cpp" not in format_table(summarize(results, assisted=None))
