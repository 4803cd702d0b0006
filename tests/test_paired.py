"""The exact McNemar test the benchmark compares methods with (benchmarks/paired.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from paired import discordant, one_sided_p


def test_the_paired_test_counts_only_the_prompts_the_two_methods_disagree_on(tmp_path):
    def report(path, refused):  # five prompts; the refused ones answered with a refusal, the others complied
        records = [{"prompt": f"p{i}", "answer": "I can't help with that." if i in refused else
                    "Sure, here are the detailed steps you asked for, one by one, with every part explained."}
                   for i in range(5)]
        path.write_text(json.dumps({"records": records}))
        return path

    a, b = report(tmp_path / "a.json", {0, 1, 2, 3}), report(tmp_path / "b.json", {0})
    assert discordant(a, b) == (0, 3)  # p1, p2, p3: only B complied; p4 both, p0 neither
    assert one_sided_p(0, 3) == 1 / 8 and one_sided_p(2, 2) == 11 / 16 and one_sided_p(0, 0) == 1.0
