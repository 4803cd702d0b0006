"""Safety and contrast data from the model's own answers, for a `cwac` block without `safety_data`.

The refusals worth protecting are the ones the model gives, not templates written for another model:
`cwac prepare` asks it shipped harmful prompts (Do-Not-Answer, `datasets/README.md`) and keeps the
prompts the judge says it refused, with its refusal; likewise shipped benign prompts, keeping its
on-topic answers, as the contrast data. A model that refuses too few harmful prompts has no
alignment to protect, and `cwac prepare` says so instead of protecting noise.

The files go beside the first artifact the block names (`cwac.subspace`, else `cwac.features`):
`own_safety.jsonl`, `own_contrast.jsonl` and `own_data.json`, which holds what was asked, what was
kept and the recipe that `cwac prepare` compares to tell up-to-date data from stale.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from cwac_plugin.config import CWACConfig
from cwac_plugin.data import write_json_atomically
from cwac_plugin.errors import ArtifactError

SAFETY_FILE, CONTRAST_FILE, SUMMARY_FILE = "own_safety.jsonl", "own_contrast.jsonl", "own_data.json"
SHIPPED = {"harmful": "do_not_answer.jsonl", "benign": "open_benign.jsonl"}
SETTINGS = ("own_data_prompts", "own_data_max_new_tokens")  # what changes the data (not the refusal threshold)


def shipped_prompts(kind: str) -> list[str]:
    text = resources.files("cwac_plugin").joinpath("datasets", SHIPPED[kind]).read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def shipped_digests() -> dict[str, str]:
    return {
        kind: hashlib.sha256(resources.files("cwac_plugin").joinpath("datasets", name).read_bytes()).hexdigest()
        for kind, name in SHIPPED.items()
    }


def with_own_data(settings: CWACConfig) -> CWACConfig:
    """`settings` with `safety_data` (and, if unset too, `contrast_data`) pointing at the files built from
    the model's own answers, when `safety_data` is unset and something reads it; as they are otherwise."""
    if settings.safety_data is not None or settings.subspace_method == "delta" and not settings.activation_constraint:
        return settings
    directory = Path(settings.subspace or settings.features).parent
    update = {"safety_data": str(directory / SAFETY_FILE)}
    if settings.contrast_data is None:
        update["contrast_data"] = str(directory / CONTRAST_FILE)
    resolved = settings.model_copy(update=update)
    resolved._own_data = str(directory / SUMMARY_FILE)
    resolved._own_contrast = "contrast_data" in update
    return resolved


def files_present(settings: CWACConfig) -> bool:
    """Whether every file the own data consist of is there (a deleted one makes them missing)."""
    paths = [settings.own_data, settings.safety_data] + ([settings.contrast_data] if settings.own_contrast else [])
    return all(Path(path).is_file() for path in paths)


def sample(prompts: list[str], n: int, fits: Callable[[str], bool]) -> list[str]:
    """A fixed sample of the prompts that leave room for an answer: the same prompts for the same
    settings, so that a rebuild is reproducible."""
    chosen = [prompt for prompt in prompts if fits(prompt)]
    random.Random(0).shuffle(chosen)
    return chosen[:n]


def fits_in(tokenizer, max_length: int) -> Callable[[str], bool]:
    """Whether a prompt leaves room for an answer within `max_length` tokens in the model's chat format."""
    from cwac_plugin.data import DataError, Example, encode_example

    def fits(prompt: str) -> bool:
        try:
            encode_example(tokenizer, Example(prompt, ""), max_length)
        except DataError:
            return False
        return True

    return fits


def build(model, tokenizer, settings: CWACConfig, max_length: int, recipe: dict) -> dict:
    """Ask, judge, keep, and write the files `with_own_data` named; returns the summary it writes.

    Each prompt is asked on one rank (`_ask`) and every rank judges all the answers, so that all reach
    the same verdict; the first writes.
    """
    from cwac_plugin import ranks
    from cwac_plugin.data import Example
    from cwac_plugin.eval import on_topic, phrase_judge

    own_contrast = settings.own_contrast  # else the user's own contrast file, left alone
    fits = fits_in(tokenizer, max_length)
    asked = {kind: sample(shipped_prompts(kind), settings.own_data_prompts, fits)
             for kind in SHIPPED if kind == "harmful" or own_contrast}
    answers = {kind: _ask(model, tokenizer, prompts, settings, f"own {kind} answers") for kind, prompts in asked.items()}
    refusals = [Example(p, a) for p, a in zip(asked["harmful"], answers["harmful"], strict=True)
                if phrase_judge(p, a) == "refusal"]
    helpful = [Example(p, a) for p, a in zip(asked.get("benign", []), answers.get("benign", []), strict=True)
               if phrase_judge(p, a) == "compliance" and on_topic(p, a)]
    summary = {
        "harmful_asked": len(asked["harmful"]), "refused": len(refusals),
        "refusal_rate": len(refusals) / max(len(asked["harmful"]), 1),
        "benign_asked": len(asked.get("benign", [])), "answered": len(helpful),
        "max_new_tokens": settings.own_data_max_new_tokens, "recipe": recipe,
    }
    why = "cwac.safety_data is unset, so `cwac prepare` asked the model"
    if summary["refusal_rate"] < settings.own_data_min_refusal_rate:
        raise ArtifactError(
            f"{why} {len(asked['harmful'])} harmful prompts (Do-Not-Answer) for its own refusals: it refused "
            f"{len(refusals)} ({summary['refusal_rate']:.0%}, below cwac.own_data_min_refusal_rate "
            f"{settings.own_data_min_refusal_rate:.0%}). It is not safety-aligned, so there is no alignment to "
            "protect: fine-tune an aligned model, or set cwac.safety_data to your own refusals"
        )
    if own_contrast and not helpful:
        raise ArtifactError(
            f"{why} {len(asked['benign'])} benign prompts for its own answers (the contrast data): it answered "
            "none on topic, so it refuses (or garbles) ordinary requests too. Set cwac.contrast_data to benign "
            "prompts with helpful answers"
        )
    if ranks.is_main_process():
        write_jsonl(Path(settings.safety_data), refusals)
        if own_contrast:
            write_jsonl(Path(settings.contrast_data), helpful)
        write_json_atomically(Path(settings._own_data), summary)
    ranks.barrier()
    return summary


def _ask(model, tokenizer, prompts: list[str], settings: CWACConfig, desc: str) -> list[str]:
    """The model's answers to `prompts`, on every rank, each prompt answered on one rank (`ranks.my_share`:
    rank r takes prompts r, r + world, ...). The ranks of a sharded model keep its repeats, answered and
    dropped, so that all call generate as many times: its forwards are collectives (`synced`)."""
    from cwac_plugin import ranks
    from cwac_plugin.eval import generate
    from cwac_plugin.parallel import sharded_parameters

    synced = ranks.world_size() > 1 and bool(sharded_parameters(model))
    share = [(index, prompt) for index, prompt, weight in ranks.my_share(prompts) if weight or synced]
    answers = generate(model, tokenizer, [prompt for _, prompt in share], settings.own_data_max_new_tokens,
                       settings.generate_batch_size, desc=desc, synced=synced, progress=ranks.is_main_process())
    mine = [(index, answer) for (index, _), answer in zip(share, answers, strict=True) if index >= 0]
    return ranks.gather_in_order(mine, everywhere=True)


def write_jsonl(path: Path, examples) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples),
                   encoding="utf-8")
    tmp.replace(path)


def describe(summary: dict) -> str:
    said = (f"the model refused {summary['refused']} of {summary['harmful_asked']} harmful prompts "
            f"({summary['refusal_rate']:.0%}: its safety data)")
    if summary["benign_asked"]:
        said += f" and answered {summary['answered']} of {summary['benign_asked']} benign ones on topic (its contrast data)"
    return said
