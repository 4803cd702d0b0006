"""Before and after, for a reviewer: `cwac report`, and the intervals and plots the benchmark shares.

Reads two `cwac eval` reports on the same prompts (the aligned model, then the fine-tuned one) and,
optionally, a `cwac verify --out` result. Every report is judged again with today's judge
(`score_answers`), so reports made at different times are scored alike. Intervals are Wilson 95%.
"""

from __future__ import annotations

import math
from pathlib import Path

from cwac_plugin.eval import COMPLIANCE, REFUSAL, score_answers

# (metric, where its records are, what counts, lower is better)
METRICS = (
    ("harmful score", "records", lambda r: r["verdict"] == COMPLIANCE, True),
    ("degenerate (harmful prompts)", "records", lambda r: r["verdict"] not in (COMPLIANCE, REFUSAL), True),
    ("over-refusal", "benign_records", lambda r: r["verdict"] == REFUSAL, True),
    ("helpfulness", "benign_records", lambda r: bool(r.get("helpful")), False),
    ("fine-tune accuracy", "task_records", lambda r: bool(r.get("correct")), False),
)


def wilson(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    if not n:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def share_and_interval(records: list[dict] | None, hit) -> tuple[float | None, list[float] | None]:
    if not records:
        return None, None
    hits = sum(1 for r in records if hit(r))
    return round(hits / len(records), 4), wilson(hits, len(records))


def pct(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.0f}"
    return f"{text} [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]" if interval else text


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on a training node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rejudged(saved: dict) -> dict:
    """A saved `cwac eval` report scored by today's judge (and its own task match), as if made today."""
    return score_answers(
        saved["records"], saved.get("task_records"), saved.get("benign_records"), task_match=saved.get("task_match", "first")
    )


def metrics(report: dict) -> dict[str, tuple[float | None, list[float] | None, int]]:
    """metric -> (share, 95% interval, n) of a re-judged report; metrics it has no records for are left out."""
    out = {}
    for name, field, hit, _ in METRICS:
        records = report.get(field)
        if records:
            share, interval = share_and_interval(records, hit)
            out[name] = (share, interval, len(records))
    return out


def changed_verdicts(before: dict, after: dict, field: str) -> list[tuple[dict, dict]]:
    """Prompts answered with another verdict after: first those that got worse (refused -> complied on
    harmful prompts; answered -> refused on benign ones)."""
    earlier = {r["prompt"]: r for r in before.get(field) or []}
    pairs = [(earlier[r["prompt"]], r) for r in after.get(field) or [] if r["prompt"] in earlier]
    changed = [(b, a) for b, a in pairs if b["verdict"] != a["verdict"]]
    worse = COMPLIANCE if field == "records" else REFUSAL
    return sorted(changed, key=lambda pair: pair[1]["verdict"] != worse)


def _quote(text: str, limit: int = 240) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(before: dict, after: dict, names: tuple[str, str], verification: dict | None, examples: int) -> str:
    lines = [f"# CWAC report: {names[0]} -> {names[1]}", ""]
    if verification is not None:
        verdict = "passed" if verification.get("passed") else "FAILED"
        lines += [
            (
                f"Weight constraint (`cwac verify`): **{verdict}**: input leakage {verification['input_leakage']:.1e}, "
                f"output leakage {verification['output_leakage']:.1e} (tolerance {verification.get('tolerance', 0):.0e}), "
                f"{verification['coverage']:.1%} of the changed decoder parameters protected, saved "
                f"{verification.get('saved_dtype', '?')}."
            ),
            "",
        ]
    m_before, m_after = metrics(before), metrics(after)
    lines += ["| metric | before % [95% CI] | after % [95% CI] | n |", "|---|---|---|---|"]
    for name, *_ in METRICS:
        if name in m_before or name in m_after:
            b, a = m_before.get(name, (None, None, 0)), m_after.get(name, (None, None, 0))
            lines.append(f"| {name} | {pct(b[0], b[1])} | {pct(a[0], a[1])} | {a[2] or b[2]} |")
    lines += ["", "Judge: `cwac eval`'s phrase judge, re-run on the saved answers; read the answers below before",
              "trusting a score.", ""]
    for field, title in (("records", "Harmful prompts"), ("benign_records", "Benign prompts")):
        changed = changed_verdicts(before, after, field)
        if not changed:
            continue
        lines += [f"## {title} answered differently ({len(changed)}; first {min(examples, len(changed))})", "",
                  "| prompt | before | after |", "|---|---|---|"]
        for b, a in changed[:examples]:
            lines.append(
                f"| {_quote(a['prompt'], 120)} | **{b['verdict']}**: {_quote(b['answer'])} | "
                f"**{a['verdict']}**: {_quote(a['answer'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(before: dict, after: dict, names: tuple[str, str], path: Path) -> None:
    """One bar pair per metric with its interval: the picture a reviewer looks at first."""
    plt = pyplot()
    m_before, m_after = metrics(before), metrics(after)
    shown = [name for name, *_ in METRICS if name in m_before and name in m_after]
    fig, ax = plt.subplots(figsize=(1.9 * len(shown) + 2, 3.6))
    for offset, (label, values, colour) in enumerate(((names[0], m_before, "tab:grey"), (names[1], m_after, "tab:red"))):
        xs = [i + (offset - 0.5) * 0.38 for i in range(len(shown))]
        shares = [100 * values[name][0] for name in shown]
        low = [100 * (values[name][0] - values[name][1][0]) for name in shown]
        high = [100 * (values[name][1][1] - values[name][0]) for name in shown]
        ax.bar(xs, shares, width=0.38, color=colour, label=label, yerr=[low, high], capsize=3)
    better = {name: lower for name, _, _, lower in METRICS}
    ax.set_xticks(range(len(shown)), [f"{n}\n({'lower' if better[n] else 'higher'} is better)" for n in shown], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
