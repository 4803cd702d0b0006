"""How the benchmark's grid names and sizes its runs (benchmarks/harmful_finetune.py, benchmarks/table.py)."""

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "smollm2_cpu"))
from harmful_finetune import mix_sizes, report_prefix
from table import parse_name


def test_every_setting_a_run_is_named_by_is_read_back_from_its_report_name():
    for split, finetune, task in itertools.product(("eval", "validation"), ("lora", "full"), ("compare", "word")):
        for run in ("p=0.1_cwac@mid_L27ps", "aligned"):
            assert parse_name(report_prefix(split, finetune, task) + run) == (split, finetune, task, run)
    assert report_prefix("eval", "lora", "compare") == ""  # the reports made before these settings keep their names


def test_the_harmful_share_is_the_one_asked_for_even_past_what_the_attack_part_holds():
    assert mix_sizes(0.1, 400, 150) == (400, 44)  # the runs made so far: all task examples
    assert mix_sizes(0.0, 400, 150) == (400, 0)
    for ratio in (0.05, 0.1, 0.2, 0.3, 0.5):
        n_task, n_harmful = mix_sizes(ratio, 400, 150)
        assert n_harmful <= 150 and abs(n_harmful / (n_task + n_harmful) - ratio) < 0.005
    assert mix_sizes(0.5, 400, 150) == (150, 150)  # not 400 + 150 (p = 0.27) as before


def test_the_word_problems_answers_follow_from_their_wording():
    import random
    import re

    from harmful_finetune import word_problem_task

    problems = word_problem_task(300, random.Random(0))
    assert len({p.prompt for p in problems}) > 290
    for problem in problems:
        a, b = map(int, re.findall(r"\d+", problem.prompt))
        if re.search(r" each |Each of ", problem.prompt):
            expected = a * b
        elif re.search(r" gave | sold | more .* than ", problem.prompt):
            expected = a - b
        else:
            expected = a + b
        assert problem.response == str(expected) and expected > 0, problem.prompt
