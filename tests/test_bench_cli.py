"""The benchmark pipeline on tiny models, prompt selection, presets and CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

from specdec import SpecEngine
from specdec.benchmarks import prompts as P
from specdec.benchmarks.methods import HFGenerate, Sampling, SpecDecMethod
from specdec.benchmarks.report import format_table, write_outputs
from specdec.benchmarks.run import run_benchmark, summarize
from specdec.cli import main, select_drafters
from specdec.drafters import create_drafter
from specdec.errors import InvalidInputError, UnknownNameError
from specdec.presets import available_presets, load_preset
from tiny_models import VOCAB, tiny_model


def test_specbench_selection_is_round_robin_over_main_categories():
    chosen = P.select(P.read_prompts(), limit=12)
    assert [p.main_category for p in chosen[:6]] == list(P.MAIN_CATEGORIES)
    assert len({p.category for p in chosen if p.main_category == "mt_bench"}) == 2  # two mt_bench sub-categories
    assert len(P.read_prompts()) == 480


def test_selection_by_category_and_unknown_category():
    chosen = P.select(P.read_prompts(), categories=["coding", "qa"], limit=5)
    assert {p.category for p in chosen} == {"coding", "qa"} and len(chosen) == 5
    with pytest.raises(UnknownNameError, match="valid: .*translation"):
        P.select(P.read_prompts(), categories=["poetry"])


def test_unreadable_prompt_file_names_path_and_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"nope": 1}\n')
    with pytest.raises(InvalidInputError, match=r"p\.jsonl:2"):
        P.read_prompts(bad)
    with pytest.raises(InvalidInputError, match="does not exist"):
        P.read_prompts(tmp_path / "missing.jsonl")


def test_presets_load_and_unknown_preset_lists_choices():
    assert {"qwen-coder-pair", "gemma-270m"} <= set(available_presets())
    assert load_preset("qwen-coder-pair")["target"] == "qwen2.5-coder-1.5b"
    with pytest.raises(UnknownNameError, match="available presets: .*qwen-coder-pair"):
        load_preset("nope")


def test_every_shipped_preset_loads_and_a_drafter_option_outside_options_is_refused(tmp_path):
    for name in available_presets():
        load_preset(name)
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: qwen2.5-coder-1.5b\ndrafters:\n  lean: {drafter: draft-model, min_prob: 0.6}\n")
    with pytest.raises(InvalidInputError, match=r"entry 'lean' has unknown keys \['min_prob'\].*options: \{"):
        load_preset(str(bad))
    bad.write_text("drafters:\n  lean: draft-model\n")
    with pytest.raises(InvalidInputError, match="must be a mapping"):
        load_preset(str(bad))


def test_unknown_drafter_lists_entries_and_registered_names():
    with pytest.raises(UnknownNameError, match="registered drafters: .*prompt-lookup"):
        select_drafters({"tree": {"drafter": "draft-model"}}, ["nope"])
    assert select_drafters({"tree": {"drafter": "draft-model"}}, ["prompt-lookup"]) == [
        {"name": "prompt-lookup", "drafter": "prompt-lookup"}]


@pytest.mark.parametrize("argv, phrase", [
    (["bench", "--config", "nope"], "available presets"),
    (["bench", "--categories", "poetry", "--limit", "1"], "unknown categories"),
    (["bench", "--drafter", "nope"], "registered drafters"),
])
def test_cli_errors_exit_2_with_the_valid_choices(argv, phrase, capsys):
    assert main(argv) == 2
    assert phrase in capsys.readouterr().err


def test_benchmark_pipeline_on_tiny_models(tmp_path):
    target = tiny_model("llama")
    draft = tiny_model("llama", seed=1)
    methods = [
        HFGenerate("plain", target),
        HFGenerate("hf-assisted", target, {"assistant_model": draft}),
        SpecDecMethod("self-draft", SpecEngine(target, create_drafter("draft-model", target=target, model=target,
                                                                       mode="chain", depth=3, quantize=None,
                                                                       min_prob=0.0))),
    ]
    prompts = [P.Prompt(str(i), cat, "x") for i, cat in enumerate(["coding", "qa", "rag"])]
    encode = lambda p: torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(int(p.id)))  # noqa
    results = run_benchmark(methods, prompts, encode, 12, None, target=target, warmup_prompt=prompts[0],
                            progress=False)
    summary = summarize(results)
    assert summary["self-draft"]["identical"] == 3 and summary["hf-assisted"]["identical"] == 3
    assert summary["self-draft"]["tau"] > 3.0  # self-drafting with depth 3 accepts (almost) everything
    assert summary["self-draft"]["acceptance_by_depth"][0] == 1.0
    assert set(summary["plain"]["by_category"]) == {"mt_bench", "qa", "rag"}
    assert "self-draft" in format_table(summary)
    paths = write_outputs(tmp_path, {"target": "tiny"}, summary, results)
    data = json.loads(paths["json"].read_text())
    assert {"tau", "speedup", "identical"} <= set(data["summary"]["self-draft"])
    assert len(data["records"]) == 9
    for key in ("acceptance_png", "accepted_lengths_png", "speedup_png"):
        assert paths[key].stat().st_size > 1000
    assert "| self-draft |" in paths["markdown"].read_text()


def test_sampling_benchmark_is_seeded_and_skips_exactness(tmp_path):
    target = tiny_model("llama")
    sampling = Sampling(do_sample=True, temperature=0.7)
    drafter = create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1), mode="chain", depth=3)
    methods = [HFGenerate("plain", target, sampling=sampling),
               SpecDecMethod("rejection-chain", SpecEngine(target, drafter, "rejection"), sampling)]
    prompts = [P.Prompt(str(i), "qa", "x") for i in range(2)]
    encode = lambda p: torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(int(p.id)))  # noqa
    runs = [run_benchmark(methods, prompts, encode, 10, None, target=target, progress=False, sampled=True, seed=5)
            for _ in range(2)]
    for name in ("plain", "rejection-chain"):  # the same seed gives the same samples, method by method
        for a, b in zip(*runs):
            assert torch.equal(a.runs[name].new_tokens, b.runs[name].new_tokens)
    # different prompts get different seeds: the two prompts of one run are not sampled alike
    seeds_differ = run_benchmark(methods[:1], [prompts[0], prompts[0]], encode, 10, None, progress=False,
                                 sampled=True)
    assert not torch.equal(seeds_differ[0].runs["plain"].new_tokens, seeds_differ[1].runs["plain"].new_tokens)
    summary = summarize(runs[0], assisted=None, sampled=True)
    assert summary["rejection-chain"]["identical"] is None and not runs[0][0].divergence
    assert "n/a (sampled)" in format_table(summary)
    written = json.loads(write_outputs(tmp_path, {}, summary, runs[0])["json"].read_text())
    assert written["records"][0]["identical"] is None


def test_pooled_speedup_divides_all_tokens_by_all_seconds():
    from specdec.benchmarks.methods import RunRecord
    from specdec.benchmarks.run import PromptResult

    def run(tokens, seconds):
        return RunRecord(torch.zeros(tokens, dtype=torch.long), seconds)

    rows = [PromptResult(P.Prompt("0", "qa", "x"), 4, {"plain": run(10, 10.0), "fast": run(100, 20.0)}),
            PromptResult(P.Prompt("1", "qa", "x"), 4, {"plain": run(100, 20.0), "fast": run(10, 10.0)})]
    summary = summarize(rows, assisted=None, sampled=True)
    assert summary["fast"]["pooled_tokens_per_s"] == pytest.approx(110 / 30)
    assert summary["fast"]["pooled_speedup"] == pytest.approx(1.0)
    assert summary["fast"]["speedup"] == pytest.approx((5.0 + 0.2) / 2)  # the median of two per-prompt ratios


def test_presets_command_lists_every_shipped_preset(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == available_presets()
    pair = "qwen-coder-pair: target qwen2.5-coder-1.5b, draft qwen2.5-coder-0.5b"
    assert any(line.startswith(pair) for line in lines)
