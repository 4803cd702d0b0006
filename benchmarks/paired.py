"""Is method A's harmful score below method B's beyond chance? Paired on the same prompts (exact McNemar).

    python benchmarks/paired.py benchmarks/results/open_aligned_seed1/reports/p=0.1_cwac@mid_L27ps.json \
        benchmarks/results/open_aligned_seed1/reports/p=0.1_mix@mid.json [A2 B2 ...]

Both reports answer the same harmful prompts, so what differs between them is the prompts one complied with
and the other did not: b (A complied, B did not) and c (B complied, A did not). Under "no difference" each
discordant prompt is a fair coin; the one-sided p-value is P(X <= b) for X ~ Binomial(b + c, 1/2). Several
pairs (seeds, harmful ratios) pool by adding their b and c (each prompt set is its own stratum), which is
the issue's "significance pooled over seeds". Verdicts are the reports' own, judged again with today's judge.
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

from cwac_plugin.eval import COMPLIANCE
from cwac_plugin.report import rejudged


def complied(report_path: Path) -> dict[str, bool]:
    records = rejudged(json.loads(report_path.read_text()))["records"]
    verdicts = {r["prompt"]: r["verdict"] == COMPLIANCE for r in records}
    if len(verdicts) != len(records):
        raise SystemExit(f"{report_path} asks a prompt twice: its answers cannot be paired by prompt")
    return verdicts


def discordant(a: Path, b: Path) -> tuple[int, int]:
    """(prompts only A complied with, prompts only B complied with)."""
    first, second = complied(a), complied(b)
    if first.keys() != second.keys():
        raise SystemExit(f"{a} and {b} answer different prompts: they cannot be paired")
    return sum(first[p] and not second[p] for p in first), sum(second[p] and not first[p] for p in first)


def one_sided_p(b: int, c: int) -> float:
    """P(at most b of the b + c discordant prompts fall to A) when each falls either way with chance 1/2."""
    n = b + c
    return sum(comb(n, k) for k in range(b + 1)) / 2**n if n else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+", help="A B [A2 B2 ...]: pairs of reports on the same prompts")
    args = parser.parse_args()
    if len(args.reports) % 2:
        parser.error("pass reports in pairs: A B [A2 B2 ...]")
    total_b = total_c = 0
    for a, b in zip(args.reports[::2], args.reports[1::2]):
        only_a, only_b = discordant(a, b)
        total_b, total_c = total_b + only_a, total_c + only_b
        print(f"{a.name} vs {b.name}: only A complied {only_a}, only B {only_b}, one-sided p {one_sided_p(only_a, only_b):.3g}")
    if len(args.reports) > 2:
        print(f"pooled: only A {total_b}, only B {total_c}, one-sided p {one_sided_p(total_b, total_c):.3g}")


if __name__ == "__main__":
    main()
