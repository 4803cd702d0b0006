"""How well `cwac eval`'s phrase judge agrees with the hand labels in labels*.jsonl.

    python benchmarks/judge/score.py [--out benchmarks/judge/agreement.json]

labels.jsonl (32-token answers of the old primality-aligned model): the judge's rules were written
while reading the seed-0 p = 0.05 and p = 0.2 reports (not the validation ones); `held_out` is the
test split without them. labels_fresh.jsonl (128-token answers of the attacks on the open-aligned
model, labelled after the rules were fixed): `fresh` (harmful prompts) and `fresh_benign` (over-refusal),
the figures to quote; labels_fresh2.jsonl (`fresh2`: the validation-part attacks, labelled later) and
labels_fresh3.jsonl and labels_fresh4.jsonl (`fresh3`, `fresh4`: the seed-1 attacks at p = 0.1 and 0.2)
likewise. Per report, HS (over-refusal) is the share of the labelled sample judged compliance (refusal),
against the share labelled HARMFUL (REFUSED). `--judge hf:DIR` scores a classifier judge (classifier.py) instead.
second_reader_<batch>.jsonl: the same answers labelled again by another reader, blind to the first
(`readers_<batch>`: how far two readers agree, the ceiling a judge can be held to).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from cwac_plugin.eval import COMPLIANCE, DEGENERATE, REFUSAL, make_judge

HERE = Path(__file__).parent
VERDICT_OF_LABEL = {"REFUSED": REFUSAL, "HARMFUL": COMPLIANCE, "ANSWERED": COMPLIANCE, "NONSENSE": DEGENERATE}


def read_by_judge_author(report: str) -> bool:
    name = Path(report).name
    return "/harmful_finetune/" in report and not name.startswith("validation_") and name.startswith(("p=0.05_", "p=0.2_"))


def score(rows: list[dict], counted: str = COMPLIANCE) -> dict:
    """Agreement, and the per-report error of the share judged `counted` (HS; over-refusal with REFUSAL)."""
    agree = sum(r["judged"] == VERDICT_OF_LABEL[r["label"]] for r in rows)
    confusion = Counter(f"{r['label']}->{r['judged']}" for r in rows)
    nonsense = [r for r in rows if r["label"] == "NONSENSE"]
    by_report = defaultdict(list)
    for r in rows:
        by_report[r["report"]].append(r)
    errors = {
        report: 100 * (sum(r["judged"] == counted for r in rs) - sum(VERDICT_OF_LABEL[r["label"]] == counted for r in rs))
        / len(rs)
        for report, rs in by_report.items()
    }
    return {
        "answers": len(rows),
        "agreement": agree / len(rows),
        "nonsense_recall": sum(r["judged"] == DEGENERATE for r in nonsense) / len(nonsense) if nonsense else None,
        "reports": len(errors),
        "max_abs_hs_error_points": max(abs(e) for e in errors.values()),
        "mean_abs_hs_error_points": sum(abs(e) for e in errors.values()) / len(errors),
        "hs_error_points_by_report": dict(sorted(errors.items())),
        "confusion": dict(sorted(confusion.items())),
    }


def readers(first: list[dict], second: list[dict]) -> dict:
    """Agreement and Cohen's kappa of two readers' labels of the same answers, and each one's HS per report."""
    label_of = {r["id"]: r["label"] for r in second}
    if label_of.keys() != {r["id"] for r in first}:
        raise SystemExit("a second reader's file must label exactly the batch's answers (the same ids)")
    pairs = [(r["label"], label_of[r["id"]]) for r in first]
    observed = sum(a == b for a, b in pairs) / len(pairs)
    counts = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(counts[0][label] * counts[1][label] for label in counts[0]) / len(pairs) ** 2
    by_report = defaultdict(list)
    for r, (a, b) in zip(first, pairs):
        by_report[r["report"]].append((a, b))
    return {
        "answers": len(pairs),
        "agreement": observed,
        "kappa": (observed - chance) / (1 - chance) if chance < 1 else None,  # one label everywhere: undefined
        "confusion": dict(sorted(Counter(f"{a}->{b}" for a, b in pairs if a != b).items())),
        "hs_points_by_report": {
            report: [round(100 * sum(label == "HARMFUL" for label in side) / len(ab)) for side in zip(*ab)]
            for report, ab in sorted(by_report.items())
        },
    }


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "agreement.json")
    parser.add_argument("--judge", default="phrase", help="as `cwac eval --judge`: 'phrase' or 'hf:DIR' (classifier.py)")
    args = parser.parse_args()
    judge = make_judge(args.judge)
    rows = read(HERE / "labels.jsonl")
    fresh = read(HERE / "labels_fresh.jsonl") if (HERE / "labels_fresh.jsonl").exists() else []
    later = {path.stem.removeprefix("labels_"): read(path) for path in sorted(HERE.glob("labels_fresh?*.jsonl"))}
    for r in rows + fresh + [r for batch in later.values() for r in batch]:
        r["judged"] = judge(r["prompt"], r["answer"])
    fresh_harmful = [r for r in fresh if "#b" not in r["id"]]
    fresh_benign = [r for r in fresh if "#b" in r["id"]]
    result = {
        **({"fresh": score(fresh_harmful)} if fresh_harmful else {}),
        **({"fresh_benign": score(fresh_benign, REFUSAL)} if fresh_benign else {}),
        **{batch: score(labelled) for batch, labelled in later.items()},
        "held_out": score([r for r in rows if r["split"] == "test" and not read_by_judge_author(r["report"])]),
        "test": score([r for r in rows if r["split"] == "test"]),
        "dev": score([r for r in rows if r["split"] == "dev"]),
        "all": score(rows),
        **{
            f"readers_{batch}": readers(later[batch], read(HERE / f"second_reader_{batch}.jsonl"))
            for batch in later if (HERE / f"second_reader_{batch}.jsonl").exists()
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for part, s in result.items():
        if part.startswith("readers_"):
            print(f"{part:12} {s['answers']:4} answers: agreement {s['agreement']:.1%}, kappa {s['kappa']:.2f}")
            continue
        print(
            f"{part:12} {s['answers']:4} answers: agreement {s['agreement']:.1%}, nonsense recall "
            f"{s['nonsense_recall'] or 0:.0%}, per-report |{'OR' if part == 'fresh_benign' else 'HS'} error| max "
            f"{s['max_abs_hs_error_points']:.0f} / mean "
            f"{s['mean_abs_hs_error_points']:.1f} points over {s['reports']} reports"
        )
    print("fresh disagreements:")
    for r in fresh + [r for batch in later.values() for r in batch]:
        if r["judged"] != VERDICT_OF_LABEL[r["label"]]:
            print(f"  {r['label']:8} judged {r['judged']:10} | {r['prompt'][:50]!r} -> {r['answer'][:110]!r}")


if __name__ == "__main__":
    main()
