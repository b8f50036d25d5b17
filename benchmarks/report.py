"""Benchmark output: a terminal table, a JSON file with every raw figure, a Markdown report and PNG plots."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from specdec.benchmarks.run import PromptResult

COLUMNS = ("method", "tok/s", "speedup", "vs HF assisted", "pooled speedup", "tau", "identical", "near-ties", "budget",
           "draft ms/step", "draft s", "verify s", "overhead ms/step")
LLAMA_CPP_COLUMN = "vs llama.cpp"  # after "vs HF assisted", in runs with a llama-cpp baseline


def columns(summary: dict) -> tuple[str, ...]:
    if not any("speedup_vs_llama-cpp" in e for e in summary.values()):
        return COLUMNS
    return COLUMNS[:4] + (LLAMA_CPP_COLUMN,) + COLUMNS[4:]


def table_rows(summary: dict) -> list[list[str]]:
    with_llama_cpp = LLAMA_CPP_COLUMN in columns(summary)
    rows = []
    for name, e in summary.items():
        rows.append([
            name,
            f"{e['tokens_per_s']:.2f}",
            f"{e['speedup']:.2f}x",
            f"{e['speedup_vs_hf-assisted']:.2f}x" if "speedup_vs_hf-assisted" in e else "-",
            *([f"{e['speedup_vs_llama-cpp']:.2f}x"] if with_llama_cpp else []),
            f"{e['pooled_speedup']:.2f}x" + (f" / {e['pooled_speedup_vs_hf-assisted']:.2f}x"
                                             if "pooled_speedup_vs_hf-assisted" in e else ""),
            f"{e['tau']:.2f}" if "tau" in e else "-",
            "n/a (sampled)" if e["identical"] is None else f"{e['identical']}/{e['prompts']}",
            "n/a (own numerics)" if e.get("own_numerics") else
            str(e["near_ties"]) if e["identical"] is not None and e["identical"] < e["prompts"] else "-",
            f"{e['median_tree_budget']:g}" if "median_tree_budget" in e else "-",
            f"{e['draft_ms_per_step']:.1f}" if "draft_ms_per_step" in e else "-",
            f"{e['draft_time']:.1f}" if "draft_time" in e else "-",
            f"{e['verify_time']:.1f}" if "verify_time" in e else "-",
            f"{e['overhead_ms_per_step']:.1f} ({100 * e['overhead_fraction']:.0f}%)" if "overhead_ms_per_step" in e
            else "-",
        ])
    return rows


def format_table(summary: dict, markdown: bool = False) -> str:
    rows, cols = table_rows(summary), columns(summary)
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def raw_records(results: list[PromptResult]) -> list[dict]:
    out = []
    for r in results:
        for name, run in r.runs.items():
            out.append({
                "prompt_id": r.prompt.id, "category": r.prompt.category, "main_category": r.prompt.main_category,
                "prompt_tokens": r.prompt_tokens, "method": name, "new_tokens": run.new_tokens.numel(),
                "seconds": run.seconds, "tokens_per_s": run.new_tokens.numel() / run.seconds,
                "identical": name not in r.divergence if r.compared else None,
                "divergence": r.divergence.get(name),
                "stats": run.stats,
            })
    return out


def write_outputs(out_dir: str | Path, setup: dict, summary: dict, results: list[PromptResult]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slim = {k: {kk: vv for kk, vv in v.items() if kk != "accepted_lengths"} for k, v in summary.items()}
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps({"setup": setup, "summary": summary, "records": raw_records(results)},
                                        indent=1, default=_jsonable))
    paths["markdown"].write_text(_markdown(setup, slim))
    paths.update(write_plots(out, summary))
    return paths


def _markdown(setup: dict, summary: dict) -> str:
    lines = ["# specdec benchmark", "", "Setup: " + ", ".join(f"{k}={v}" for k, v in setup.items()), "",
             format_table(summary, markdown=True), "", "## By category (speedup vs plain generate / tau)", ""]
    cats = sorted({c for e in summary.values() for c in e["by_category"]})
    lines.append("| method | " + " | ".join(cats) + " |")
    lines.append("|---|" + "---|" * len(cats))
    for name, e in summary.items():
        cells = []
        for c in cats:
            ce = e["by_category"].get(c)
            cells.append("-" if ce is None
                         else f"{ce['speedup']:.2f}x" + (f" / {ce['tau']:.2f}" if "tau" in ce else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Acceptance rate by draft depth", ""]
    for name, e in summary.items():
        if e.get("acceptance_by_depth"):
            rates = ", ".join("-" if math.isnan(x) else f"{x:.2f}" for x in e["acceptance_by_depth"])
            lines.append(f"- {name}: {rates}")
    described = {name: e["drafter_info"] for name, e in summary.items() if e.get("drafter_info")}
    if described:  # what each drafter chose or holds (layer sets, heads and their memory, ...) after the last prompt
        lines += ["", "## Drafters", ""]
        lines += [f"- {name}: " + ", ".join(f"{k}={v}" for k, v in info.items()) for name, info in described.items()]
    return "\n".join(lines) + "\n"


def write_plots(out: Path, summary: dict) -> dict[str, Path]:
    """PNG plots of acceptance by depth, accepted lengths and speedup by category; none without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'specdec[bench]')", file=sys.stderr)
        return {}

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    spec = {k: v for k, v in summary.items() if v.get("acceptance_by_depth")}
    if spec:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, e in spec.items():
            rates = e["acceptance_by_depth"]
            ax.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
        ax.set(xlabel="draft depth", ylabel="acceptance rate", title="Acceptance rate by depth", ylim=(0, 1.05))
        ax.legend()
        paths["acceptance_png"] = _save(fig, out / "acceptance_by_depth.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, e in spec.items():
            lengths = e["accepted_lengths"]
            ax.hist(lengths, bins=range(1, max(lengths) + 2), alpha=0.5, label=name, align="left")
        ax.set(xlabel="tokens per target forward", ylabel="steps", title="Accepted lengths")
        ax.legend()
        paths["accepted_lengths_png"] = _save(fig, out / "accepted_lengths.png")

    cats = sorted({c for e in summary.values() for c in e["by_category"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats)), 4))
    width = 0.8 / max(1, len(summary))
    for i, (name, e) in enumerate(summary.items()):
        ax.bar([j + i * width for j in range(len(cats))],
               [e["by_category"].get(c, {}).get("speedup", 0) for c in cats], width, label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=20)
    ax.set(ylabel="speedup vs plain generate", title="Speedup by category")
    ax.legend(fontsize=8)
    paths["speedup_png"] = _save(fig, out / "speedup_by_category.png")
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)
