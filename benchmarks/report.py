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
    """One row per variant (`--tag`: a setting of the attack or of CWAC), HS and FA against p per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"plain": "tab:blue", "weight": "tab:orange", "activation": "tab:green", "cwac": "tab:red"}
    variants = sorted({method.partition("@")[2] for method in methods_in(results)})
    fig, axes = plt.subplots(len(variants), 2, figsize=(11, 3.2 * len(variants)), squeeze=False, sharey="col")
    for row, variant in zip(axes, variants):
        attack_lrs = set()
        for base in METHODS:
            method = f"{base}@{variant}" if variant else base
            points = sorted(
                (float(key.split("/")[0][2:]), r) for key, r in results["runs"].items() if key.endswith(f"/{method}")
            )
            if not points:
                continue
            attack_lrs |= {r["attack_lr"] for _, r in points}
            style = {"marker": "o", "label": base, "color": colours.get(base)}
            xs = [p for p, _ in points]
            row[0].plot(xs, [100 * r["harmful_score"] for _, r in points], **style)
            row[1].plot(xs, [100 * r["fine_tune_accuracy"] for _, r in points], **style)
        if "aligned" in results:
            row[0].axhline(100 * results["aligned"]["harmful_score"], color="grey", ls="--", lw=0.8, label="aligned")
        setting = f"{variant or 'no --tag'}, attack lr {', '.join(f'{lr:g}' for lr in sorted(attack_lrs))}"
        for ax, title in zip(row, ("harmful score (lower is better)", "fine-tune accuracy")):
            ax.set_xlabel("harmful ratio p")
            ax.set_ylabel("%")
            ax.set_title(f"{title}: {setting}", fontsize=9)
        row[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, LoRA attack, CPU")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/harmful_finetune")
    results = json.loads((folder / "results.json").read_text())
    (folder / "results.md").write_text(tables(results))
    plot(results, folder / "hs_fa.png")
    print((folder / "results.md").read_text())


if __name__ == "__main__":
    main()
