"""Checks the hand-written data files in this folder (standard library only).

Run from anywhere:  python benchmarks/data/check.py
Exits with status 1 and lists the problems if any check fails.
"""
import collections
import itertools
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the align set ships with the package: `cwac prepare` asks the model these for its own contrast data
ALIGN = HERE.parents[1] / "cwac_plugin" / "datasets" / "open_benign.jsonl"
KINDS = ("everyday", "sounds_unsafe")
MIN_PROMPTS = {"open_benign_eval.jsonl": 160, "open_benign.jsonl": 320}
N_REFUSALS = 48
UNSAFE_SHARE = (0.25, 0.40)  # allowed share of sounds_unsafe prompts per file (target about 30%)
WORDS = (5, 25)  # allowed words per prompt
MAX_JACCARD = 0.8  # eval vs align word-set overlap must not exceed this
TYPO_APOSTROPHE = "\u2019"

problems = []


def fail(msg):
    problems.append(msg)


def normalise(text):
    text = text.lower().replace(TYPO_APOSTROPHE, "'")
    text = re.sub(r"[^\w\s]", "", text)
    return " ".join(text.split())


def words(text):
    return set(normalise(text).split())


def jaccard(a, b):
    return len(a & b) / len(a | b) if a | b else 1.0


def load(name, fields):
    path = ALIGN if name == ALIGN.name else HERE / name
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            if n != len(path.read_text(encoding="utf-8").split("\n")):
                fail(f"{name}:{n}: blank line")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{name}:{n}: invalid JSON ({e})")
            continue
        if not isinstance(row, dict):
            fail(f"{name}:{n}: not a JSON object")
            continue
        if set(row) != set(fields):
            fail(f"{name}:{n}: fields {sorted(row)} != {sorted(fields)}")
            continue
        if not all(isinstance(row[f], str) and row[f].strip() for f in fields):
            fail(f"{name}:{n}: every field must be a non-empty string")
            continue
        rows.append((n, row))
    return rows


def check_prompts(name, rows):
    count = collections.Counter(r["kind"] for _, r in rows)
    for n, r in rows:
        if r["kind"] not in KINDS:
            fail(f"{name}:{n}: kind {r['kind']!r} not in {KINDS}")
        if not re.fullmatch(r"[a-z_]{2,24}", r["topic"]):
            fail(f"{name}:{n}: topic {r['topic']!r} is not a short lowercase tag")
        k = len(normalise(r["prompt"]).split())
        if not WORDS[0] <= k <= WORDS[1]:
            fail(f"{name}:{n}: prompt has {k} words, outside {WORDS}: {r['prompt']!r}")
    if len(rows) < MIN_PROMPTS[name]:
        fail(f"{name}: {len(rows)} prompts, need at least {MIN_PROMPTS[name]}")
    share = count["sounds_unsafe"] / max(len(rows), 1)
    if not UNSAFE_SHARE[0] <= share <= UNSAFE_SHARE[1]:
        fail(f"{name}: sounds_unsafe share {share:.2f} outside {UNSAFE_SHARE}")
    seen = {}
    for n, r in rows:
        key = normalise(r["prompt"])
        if key in seen:
            fail(f"{name}:{n}: duplicate of line {seen[key]}: {r['prompt']!r}")
        seen.setdefault(key, n)
    # near-duplicates inside one file are reported, not failed
    near = [
        (jaccard(words(a["prompt"]), words(b["prompt"])), i, j)
        for (i, a), (j, b) in itertools.combinations(rows, 2)
    ]
    for s, i, j in sorted(near, reverse=True):
        if s <= MAX_JACCARD:
            break
        print(f"  note: {name} lines {i} and {j} have word-set Jaccard {s:.2f}")
    topics = collections.Counter(r["topic"] for _, r in rows)
    print(f"{name}: {len(rows)} prompts; " + ", ".join(f"{k} {count[k]}" for k in KINDS)
          + f" (sounds_unsafe {share:.0%}); {len(topics)} topics")
    print("  topics: " + ", ".join(f"{t} {c}" for t, c in sorted(topics.items())))
    return seen


def check_refusals(rows):
    name = "refusals.jsonl"
    if len(rows) != N_REFUSALS:
        fail(f"{name}: {len(rows)} responses, need exactly {N_REFUSALS}")
    ascii_only = typo_only = 0
    seen = {}
    for n, r in rows:
        text = r["response"]
        has_ascii, has_typo = "'" in text, TYPO_APOSTROPHE in text
        if has_ascii and has_typo:
            fail(f"{name}:{n}: mixes ASCII and typographic apostrophes")
        elif not (has_ascii or has_typo):
            fail(f"{name}:{n}: has no apostrophe, so it counts for neither half")
        ascii_only += has_ascii and not has_typo
        typo_only += has_typo and not has_ascii
        sentences = len(re.findall(r"[.!?]+(?=\s|$)", text.strip()))
        if not 1 <= sentences <= 2:
            fail(f"{name}:{n}: {sentences} sentences, want 1-2")
        key = normalise(text)
        if key in seen:
            fail(f"{name}:{n}: duplicate of line {seen[key]}")
        seen.setdefault(key, n)
    if ascii_only != typo_only:
        fail(f"{name}: {ascii_only} with ASCII apostrophes vs {typo_only} with typographic ones")
    ai = sum("AI" in r["response"].split() or "AI," in r["response"] for _, r in rows)
    print(f"{name}: {len(rows)} responses; {ascii_only} ASCII apostrophe, {typo_only} typographic; "
          f"{ai} mention being an AI")


def main():
    eval_rows = load("open_benign_eval.jsonl", ("prompt", "kind", "topic"))
    align_rows = load("open_benign.jsonl", ("prompt", "kind", "topic"))
    eval_seen = check_prompts("open_benign_eval.jsonl", eval_rows)
    align_seen = check_prompts("open_benign.jsonl", align_rows)
    for key in sorted(eval_seen.keys() & align_seen.keys()):
        fail(f"prompt in both eval (line {eval_seen[key]}) and align (line {align_seen[key]}): {key!r}")
    align_words = [(n, words(r["prompt"])) for n, r in align_rows]
    worst = (0.0, None, None)
    for n, r in eval_rows:
        w = words(r["prompt"])
        for m, v in align_words:
            s = jaccard(w, v)
            if s > worst[0]:
                worst = (s, n, m)
            if s > MAX_JACCARD:
                fail(f"eval line {n} and align line {m} overlap (Jaccard {s:.2f}): {r['prompt']!r}")
    if worst[1] is not None:
        print(f"eval vs align: highest word-set Jaccard {worst[0]:.2f} "
              f"(eval line {worst[1]}, align line {worst[2]}); limit {MAX_JACCARD}")
    check_refusals(load("refusals.jsonl", ("response",)))
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s)")
        for p in problems:
            print("  " + p)
        return 1
    print("\nOK: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
