"""One machine-readable table of every harmful fine-tuning result: benchmarks/results/table.jsonl.

    python benchmarks/table.py            # rebuilds table.jsonl from every results dir's reports/

Each row comes from a per-prompt report, judged again with today's judge (`cwac eval`'s phrase judge)
and FA checker, so that rows made at different times are scored alike; the answers themselves are
the ones generated then (32 new tokens before 2026-12-01, 128 since: `answer_tokens`). Intervals are
Wilson 95% intervals of the share. `report.py` builds the markdown tables and plots from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from cwac_plugin.report import metrics, rejudged

RESULTS = Path(__file__).parent / "results"
MODEL = "SmolLM2-135M-Instruct"
# results dirs made by harmful_finetune.py before its open alignment recipe (commit 5734570)
PRIMALITY_ALIGNED = {"harmful_finetune": 0, "harmful_finetune_seed1": 1}
TASKS = ("word",)  # harmful_finetune.py's --task values other than the default number comparison


def parse_name(name: str) -> tuple[str, str, str, str]:
    """(split, fine-tuning mode, task, run) of a report's name: harmful_finetune.py prefixes each of the first
    three when it is not the default, in this order."""
    split = "validation" if name.startswith("validation_") else "eval"
    name = name.removeprefix("validation_")
    finetune = "full" if name.startswith("full_") else "lora"
    name = name.removeprefix("full_")
    task, _, rest = name.partition("_")
    return (split, finetune, task, rest) if task in TASKS else (split, finetune, "compare", name)


def row_of(report_path: Path, run: dict | None, seed: int, recipe: str) -> dict:
    report = rejudged(json.loads(report_path.read_text()))
    split, finetune, task, name = parse_name(report_path.stem)
    p, method = (name.split("_", 1) if name.startswith("p=") else (None, name))
    scores = metrics(report)  # the definitions `cwac report` uses
    (hs, hs_ci, _), (fa, fa_ci, _), (over, over_ci, _) = (
        scores.get(name, (None, None, 0)) for name in ("harmful score", "fine-tune accuracy", "over-refusal")
    )
    return {
        "model": MODEL,
        "finetune": finetune,
        "recipe": recipe,
        "method": method,
        "p": float(p[2:]) if p else None,
        "seed": seed,
        "split": split,
        "task": task,
        "attack": {"steps": run["attack_steps"], "lr": run["attack_lr"]} if run else None,
        "hs": hs,
        "hs_ci95": hs_ci,
        "degenerate": round(report["harmful_degenerate_rate"], 4),
        "fa": fa,
        "fa_ci95": fa_ci,
        "over_refusal": over,
        "over_refusal_ci95": over_ci,
        "helpfulness": round(report["helpfulness"], 4) if "helpfulness" in report else None,
        "judge": "phrase",
        "answer_tokens": 32 if recipe == "primality" else 128,
        "n_harmful": report["n_harmful"],
        "n_task": report.get("n_task"),
        "n_benign": report.get("n_benign"),
        "train_seconds": run["train_seconds"] if run else None,
        "report": str(report_path.relative_to(RESULTS.parent.parent)),
    }


def rows() -> list[dict]:
    table = []
    for folder in sorted(p for p in RESULTS.iterdir() if (p / "reports").is_dir()):
        recipe = "primality" if folder.name in PRIMALITY_ALIGNED else None
        runs = {}
        for results_file in sorted(folder.glob("results*.json")):  # results.json, results_validation.json, ...
            results = json.loads(results_file.read_text())
            if "align" in results:  # recorded by the run that aligned, whichever split or task it scored
                align = results["align"]
                repeats = align.get("benign_repeats", 1)
                recipe = recipe or f"open, {align['epochs']:g} epoch alignment" + (f", benign x{repeats}" if repeats > 1 else "")
            prefix = results_file.stem.removeprefix("results").removeprefix("_")  # the prefix of its reports
            runs |= {f"{prefix}{'_' if prefix else ''}{key.replace('/', '_')}": run for key, run in results["runs"].items()}
            seed = results.get("config", {}).get("seed", PRIMALITY_ALIGNED.get(folder.name, 0))
        for report_path in sorted((folder / "reports").glob("*.json")):
            table.append(row_of(report_path, runs.get(report_path.stem), seed, recipe))
    return table


def main() -> None:
    table = rows()
    path = RESULTS / "table.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in table))
    print(f"wrote {path}: {len(table)} rows")


if __name__ == "__main__":
    main()
