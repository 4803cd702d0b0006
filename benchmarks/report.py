"""Tables (markdown) and a plot (PNG) of benchmarks/harmful_finetune.py's results.json.

    python benchmarks/report.py benchmarks/results/harmful_finetune
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ["plain", "weight", "activation", "cwac"]


def methods_in(results: dict) -> list[str]:
    """The four methods first, then variants run with --tag (shown as method@tag)."""
    found = {key.split("/", 1)[1] for key in results["runs"]}
    return [m for m in METHODS if m in found] + sorted(found - set(METHODS))


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def tables(results: dict) -> str:
    lines = []
    for name in ("unaligned", "aligned"):
        r = results.get(name)
        if r:
            lines.append(
                f"- {name}: HS {pct(r['harmful_score'])}%, FA {pct(r['fine_tune_accuracy'])}%, "
                f"over-refusal {pct(r['over_refusal'])}%, degenerate {pct(r['harmful_degenerate_rate'])}%"
            )
    ratios = sorted({float(key.split("/")[0][2:]) for key in results["runs"]})
    for ratio in ratios:
        lines += [
            "",
            f"### p = {ratio}",
            "",
            "| method | HS % | FA % | over-refusal % | degenerate % | train s |",
            "|---|---|---|---|---|---|",
        ]
        for method in methods_in(results):
            r = results["runs"].get(f"p={ratio}/{method}")
            if r:
                lines.append(
                    f"| {method} | {pct(r['harmful_score'])} | {pct(r['fine_tune_accuracy'])} | "
                    f"{pct(r['over_refusal'])} | {pct(r['harmful_degenerate_rate'])} | {r['train_seconds']} |"
                )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    # colour = method, line style = variant (`--tag`), so that a variant's four methods read as one set
    colours = {"plain": "tab:blue", "weight": "tab:orange", "activation": "tab:green", "cwac": "tab:red"}
    variants = sorted({method.partition("@")[2] for method in methods_in(results)})
    styles = dict(zip(variants, ["-", "--", ":", "-."] * len(variants)))
    for method in methods_in(results):
        points = sorted(
            (float(key.split("/")[0][2:]), r) for key, r in results["runs"].items() if key.endswith(f"/{method}")
        )
        if not points:
            continue
        base, _, variant = method.partition("@")
        style = {"marker": "o", "label": method, "color": colours.get(base), "ls": styles[variant]}
        xs = [p for p, _ in points]
        axes[0].plot(xs, [100 * r["harmful_score"] for _, r in points], **style)
        axes[1].plot(xs, [100 * r["fine_tune_accuracy"] for _, r in points], **style)
    if "aligned" in results:
        axes[0].axhline(100 * results["aligned"]["harmful_score"], color="grey", ls="--", lw=0.8, label="aligned")
    for ax, title in zip(axes, ("harmful score (lower is better)", "fine-tune accuracy")):
        ax.set_xlabel("harmful ratio p")
        ax.set_ylabel("%")
        ax.set_title(title)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right")
    fig.suptitle("SmolLM2-135M-Instruct, LoRA attack, CPU")
    fig.tight_layout(rect=(0, 0, 0.82, 0.95))
    fig.savefig(path, dpi=120)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/harmful_finetune")
    results = json.loads((folder / "results.json").read_text())
    (folder / "results.md").write_text(tables(results))
    plot(results, folder / "hs_fa.png")
    print((folder / "results.md").read_text())


if __name__ == "__main__":
    main()
