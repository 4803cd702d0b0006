"""Markdown tables and plots of the harmful fine-tuning results, from benchmarks/results/table.jsonl.

    python benchmarks/table.py     # re-judges every saved report into table.jsonl
    python benchmarks/report.py    # results/results.md and one hs_fa_<recipe>_seed<N>.png per recipe and seed

Every figure is today's judge on the answers saved with each run (`table.py`); 95% Wilson intervals.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from cwac_plugin.report import pct, pyplot

RESULTS = Path(__file__).parent / "results"
METHODS = ["plain", "weight", "activation", "cwac", "mix", "safelora", "asft", "lisa"]
TASK_NAMES = {"compare": "number comparison", "word": "arithmetic word problems"}
COLOURS = {
    "plain": "tab:blue", "weight": "tab:orange", "activation": "tab:green", "cwac": "tab:red", "mix": "tab:purple",
    "safelora": "tab:brown", "asft": "tab:pink", "lisa": "tab:olive",
}


def method_order(method: str) -> tuple:
    base, _, variant = method.partition("@")
    return (variant, METHODS.index(base) if base in METHODS else len(METHODS), base)


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by recipe, seed, split, fine-tuning mode and task; the models before the attack (scored with the
    LoRA runs) head the full fine-tuning groups too."""
    grouped = defaultdict(list)
    for row in rows:
        grouped[row["recipe"], row["seed"], row["split"], row["finetune"], row["task"]].append(row)
    for (recipe, seed, split, finetune, task), group in grouped.items():
        if finetune != "lora":
            group[:0] = [r for r in grouped.get((recipe, seed, split, "lora", task), []) if r["p"] is None]
    return dict(sorted(grouped.items()))


def tables(rows: list[dict]) -> str:
    lines = ["# Harmful fine-tuning results (re-judged; `benchmarks/table.py`)", ""]
    header = "| method | p | HS % [95% CI] | degenerate % | FA % | over-refusal % | helpfulness % | report |"
    for (recipe, seed, split, finetune, task), group in groups(rows).items():
        title = f"## recipe {recipe}, seed {seed}, {split} split" + ("" if finetune == "lora" else ", full fine-tuning") + (
            "" if task == "compare" else f", task: {TASK_NAMES[task]}")
        lines += [title, "", header, "|---|---|---|---|---|---|---|---|"]
        for row in sorted(group, key=lambda r: (r["p"] is not None, r["p"] or 0, method_order(r["method"]))):
            lines.append(
                f"| {row['method']} | {row['p'] if row['p'] is not None else '–'} | {pct(row['hs'], row['hs_ci95'])} | "
                f"{pct(row['degenerate'])} | {pct(row['fa'])} | {pct(row['over_refusal'])} | {pct(row['helpfulness'])} | "
                f"`{Path(row['report']).name}` |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(group: list[dict], title: str, path: Path) -> None:
    """HS and FA against p, one line per method (variants: one row of panels each), intervals shaded."""
    plt = pyplot()
    runs = [r for r in group if r["p"] is not None]
    variants = sorted({r["method"].partition("@")[2] for r in runs})
    fig, axes = plt.subplots(len(variants), 2, figsize=(11, 3.2 * len(variants)), squeeze=False, sharey="col")
    aligned = next((r for r in group if r["method"] == "aligned"), None)
    for row_axes, variant in zip(axes, variants):
        for base in METHODS:
            method = f"{base}@{variant}" if variant else base
            points = sorted((r for r in runs if r["method"] == method), key=lambda r: r["p"])
            if not points:
                continue
            xs = [r["p"] for r in points]
            for ax, key in zip(row_axes, ("hs", "fa")):
                ax.plot(xs, [100 * r[key] for r in points], marker="o", label=base, color=COLOURS[base])
                ax.fill_between(xs, [100 * r[f"{key}_ci95"][0] for r in points], [100 * r[f"{key}_ci95"][1] for r in points],
                                color=COLOURS[base], alpha=0.12)
        if aligned:
            row_axes[0].axhline(100 * aligned["hs"], color="grey", ls="--", lw=0.8, label="aligned")
        for ax, name in zip(row_axes, ("harmful score (lower is better)", "fine-tune accuracy")):
            ax.set_xlabel("harmful ratio p")
            ax.set_ylabel("%")
            ax.set_title(f"{name}: {variant or 'default attack'}", fontsize=9)
        row_axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    rows = [json.loads(line) for line in (RESULTS / "table.jsonl").read_text().splitlines() if line.strip()]
    (RESULTS / "results.md").write_text(tables(rows))
    for (recipe, seed, split, finetune, task), group in groups(rows).items():
        if split == "eval" and any(r["p"] is not None for r in group):
            suffix = ("" if finetune == "lora" else "_full") + ("" if task == "compare" else f"_{task}")
            mode = "LoRA" if finetune == "lora" else "full fine-tuning"
            plot(group, f"SmolLM2-135M-Instruct, {mode} attack, recipe {recipe}, seed {seed}, task: {TASK_NAMES[task]} (re-judged)",
                 RESULTS / f"hs_fa_{re.sub(r'[^a-z0-9]+', '_', recipe.lower()).strip('_')}_seed{seed}{suffix}.png")
    print(f"wrote {RESULTS / 'results.md'}")


if __name__ == "__main__":
    main()
