"""Deterministic selection of model answers for the hand-labelled refusal-judge set.

    python3 benchmarks/judge/select.py --out /tmp/judge_selection.jsonl

Reads the committed evaluation reports (standard library only), samples PER_REPORT answers from each
report in REPORTS with a random.Random seeded from the report's path, and writes one JSON line per
answer: id, report, index, prompt, area, answer, split. The old judge's `verdict` is NOT copied.

Variety caps, applied in the fixed order of REPORTS and of each report's shuffled indices:
  - at most PER_REPORT_DUP answers with the same exact (stripped) text from one report;
  - at most GLOBAL_DUP answers with the same exact (stripped) text over the whole set.
A skipped answer is replaced by the next index in that report's shuffled order.
"""
import argparse
import hashlib
import json
import os
import random
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S0 = "benchmarks/results/harmful_finetune/reports"
S1 = "benchmarks/results/harmful_finetune_seed1/reports"

PER_REPORT = 10
PER_REPORT_DUP = 2
GLOBAL_DUP = 40

# (report path relative to the repository root, split). Within each (source, method) group the p values
# alternate between dev and test, so that both splits hold every method, both seeds and validation runs;
# 23 reports per split.
REPORTS = [
    # seed 0, eval part
    (f"{S0}/p=0.05_plain.json", "dev"),
    (f"{S0}/p=0.1_plain.json", "test"),
    (f"{S0}/p=0.2_plain.json", "dev"),
    (f"{S0}/p=0.05_plain@mid.json", "test"),
    (f"{S0}/p=0.1_plain@mid.json", "dev"),
    (f"{S0}/p=0.2_plain@mid.json", "test"),
    (f"{S0}/p=0.1_plain@strong.json", "test"),
    (f"{S0}/p=0.1_weight.json", "dev"),
    (f"{S0}/p=0.05_weight@mid.json", "dev"),
    (f"{S0}/p=0.1_weight@mid.json", "test"),
    (f"{S0}/p=0.2_weight@mid.json", "dev"),
    (f"{S0}/p=0.1_activation.json", "test"),
    (f"{S0}/p=0.05_activation@mid.json", "test"),
    (f"{S0}/p=0.1_activation@mid.json", "dev"),
    (f"{S0}/p=0.2_activation@mid.json", "test"),
    (f"{S0}/p=0.05_cwac.json", "dev"),
    (f"{S0}/p=0.1_cwac.json", "test"),
    (f"{S0}/p=0.2_cwac.json", "dev"),
    (f"{S0}/p=0.05_cwac@mid.json", "test"),
    (f"{S0}/p=0.1_cwac@mid.json", "dev"),
    (f"{S0}/p=0.2_cwac@mid.json", "test"),
    (f"{S0}/p=0.1_cwac@strong.json", "dev"),
    # seed 1, eval part
    (f"{S1}/p=0.1_plain.json", "dev"),
    (f"{S1}/p=0.05_plain@mid.json", "dev"),
    (f"{S1}/p=0.1_plain@mid.json", "test"),
    (f"{S1}/p=0.2_plain@mid.json", "dev"),
    (f"{S1}/p=0.1_weight.json", "dev"),
    (f"{S1}/p=0.2_weight.json", "test"),
    (f"{S1}/p=0.05_weight@mid.json", "test"),
    (f"{S1}/p=0.1_weight@mid.json", "dev"),
    (f"{S1}/p=0.2_weight@mid.json", "test"),
    (f"{S1}/p=0.05_activation@mid.json", "dev"),
    (f"{S1}/p=0.1_activation@mid.json", "test"),
    (f"{S1}/p=0.2_activation@mid.json", "dev"),
    (f"{S1}/p=0.1_cwac.json", "test"),
    (f"{S1}/p=0.05_cwac@mid.json", "test"),
    (f"{S1}/p=0.1_cwac@mid.json", "dev"),
    (f"{S1}/p=0.2_cwac@mid.json", "test"),
    # seed 0, validation part
    (f"{S0}/validation_p=0.1_plain.json", "test"),
    (f"{S0}/validation_p=0.1_plain@mid.json", "dev"),
    (f"{S0}/validation_p=0.2_plain@mid.json", "test"),
    (f"{S0}/validation_p=0.1_weight@mid.json", "dev"),
    (f"{S0}/validation_p=0.1_activation@mid.json", "test"),
    (f"{S0}/validation_p=0.1_cwac.json", "dev"),
    (f"{S0}/validation_p=0.1_cwac@mid.json", "test"),
    (f"{S0}/validation_p=0.2_cwac@mid.json", "dev"),
]


# The fresh batch: answers of 128 new tokens from the attacks on the open-aligned model (seed 0, @mid),
# run after the judge's rules were fixed; nobody had read them before they were labelled.
O = "benchmarks/results/open_aligned/reports"
FRESH_REPORTS = [(f"{O}/p={p}_{m}@mid.json", "fresh") for p in ("0.1", "0.2") for m in ("plain", "weight", "activation", "cwac")]
FRESH_PER_REPORT = 25
FRESH_BENIGN_PER_REPORT = 15
# The second fresh batch: the validation-part attacks on the same model (plain and activation-only, seed 0,
# @mid), run and labelled after the first fresh batch's figures were taken, to score the judge on answers
# that nobody had read (harmful prompts only; its own seed prefix, so its shuffles are new ones).
FRESH2_REPORTS = [(f"{O}/validation_p={p}_{m}@mid.json", "fresh2") for p in ("0.1", "0.2") for m in ("plain", "activation")]
LATER_PER_REPORT = 30  # the second fresh batch and those after it
# The third: the seed-1 attacks on the seed-1 open-aligned model (eval part, p = 0.1), plain and weight-only
# `@mid`, activation-only and CWAC in the default form (`@mid_L27ps`), labelled blind.
O1 = "benchmarks/results/open_aligned_seed1/reports"
FRESH3_REPORTS = [(f"{O1}/p=0.1_{m}.json", "fresh3") for m in ("plain@mid", "weight@mid", "activation@mid_L27ps", "cwac@mid_L27ps")]
# The fourth: the same four methods at p = 0.2, run after the model judge (classifier.py) was written, so that it
# and the phrase judge are scored on answers neither was fit on.
FRESH4_REPORTS = [(f"{O1}/p=0.2_{m}.json", "fresh4") for m in ("plain@mid", "weight@mid", "activation@mid_L27ps", "cwac@mid_L27ps")]


def report_id(rel):
    """'<results dir>/<file stem>': the stem alone is not unique (seed 0 and seed 1 share file names)."""
    parts = rel.split("/")
    return f"{parts[-3]}/{os.path.splitext(parts[-1])[0]}"


def seed_for(rel, prefix="0"):
    return int(hashlib.sha256(f"{prefix}|{rel}".encode()).hexdigest()[:16], 16)


def select(reports=REPORTS, per_report=PER_REPORT, field="records", seed_prefix="0"):
    """`field`: the report's harmful answers (`records`) or its benign ones (`benign_records`, ids `#b<i>`)."""
    global_count = Counter()
    out = []
    for rel, split in reports:
        with open(os.path.join(ROOT, rel)) as f:
            records = json.load(f)[field]
        order = list(range(len(records)))
        random.Random(seed_for(rel if field == "records" else f"{rel}|{field}", seed_prefix)).shuffle(order)
        local_count = Counter()
        chosen = []
        for i in order:
            if len(chosen) == per_report:
                break
            text = records[i]["answer"].strip()
            if local_count[text] >= PER_REPORT_DUP or global_count[text] >= GLOBAL_DUP:
                continue
            local_count[text] += 1
            global_count[text] += 1
            chosen.append(i)
        for i in sorted(chosen):
            r = records[i]
            tag = "" if field == "records" else "b"
            out.append({"id": f"{report_id(rel)}#{tag}{i}", "report": rel, "index": i, "prompt": r["prompt"],
                        "area": r.get("area") or r.get("kind"), "answer": r["answer"], "split": split})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/judge_selection.jsonl")
    ap.add_argument("--batch", choices=["first", "fresh", "fresh2", "fresh3", "fresh4"], default="first",
                    help="labels.jsonl, or labels_<batch>.jsonl")
    args = ap.parse_args()
    reports, per_report, prefix = {
        "first": (REPORTS, PER_REPORT, "0"), "fresh": (FRESH_REPORTS, FRESH_PER_REPORT, "0"),
        "fresh2": (FRESH2_REPORTS, LATER_PER_REPORT, "fresh2"), "fresh3": (FRESH3_REPORTS, LATER_PER_REPORT, "fresh3"),
        "fresh4": (FRESH4_REPORTS, LATER_PER_REPORT, "fresh4"),
    }[args.batch]
    rows = select(reports, per_report, seed_prefix=prefix)
    if args.batch == "fresh":
        rows += select(reports, FRESH_BENIGN_PER_REPORT, "benign_records")
    with open(args.out, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"{len(rows)} answers from {len(reports)} reports -> {args.out}")


if __name__ == "__main__":
    main()
