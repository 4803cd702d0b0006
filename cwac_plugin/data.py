"""Prompt/response sets (safety and contrast data) and their tokenisation.

Errors name the file and line: a malformed safety set must fail before a model is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    source: str = field(default="", compare=False)  # "file:line", for error messages


class DataError(ValueError):
    """A data file named in the `cwac` block is missing or malformed."""


def load_examples(path: str | Path, key: str, max_examples: int | None = None) -> list[Example]:
    """Read a jsonl file of {"prompt": ..., "response": ...} objects; `key` names the YAML key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: file {path} does not exist; point {key} at a jsonl file of prompt/response pairs")
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{key}: {path}:{line_no} is not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not all(
                isinstance(record.get(field), str) for field in ("prompt", "response")
            ):
                raise DataError(f"{key}: {path}:{line_no} needs string fields 'prompt' and 'response'")
            examples.append(Example(record["prompt"], record["response"], f"{key}: {path}:{line_no}"))
            if max_examples is not None and len(examples) >= max_examples:
                break
    if not examples:
        raise DataError(f"{key}: {path} holds no examples")
    return examples


def encode_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + response in the model's chat format, and the prompt's length.

    The chat template is used when the tokenizer has one, since that is how the aligned model
    saw refusals; otherwise prompt and response are joined by a newline and closed with EOS.
    """
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=True
        )
        full_ids = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": example.prompt},
                {"role": "assistant", "content": example.response},
            ],
            tokenize=True,
        )
        prompt_ids, full_ids = _as_ids(prompt_ids), _as_ids(full_ids)
    else:
        prompt_ids = tokenizer(example.prompt + "\n", add_special_tokens=True)["input_ids"]
        full_ids = prompt_ids + tokenizer(example.response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full_ids.append(tokenizer.eos_token_id)
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"{example.source or 'an example'}: the prompt alone is {len(prompt_ids)} tokens, so none of the "
            f"response fits in {max_length} (cwac.max_length, else sequence_len); raise cwac.max_length or "
            "shorten or drop the prompt"
        )
    return full_ids[:max_length], len(prompt_ids)


def check_lengths(tokenizer, examples: list[Example], max_length: int) -> None:
    """Tokenise everything once, cheaply, so that a prompt that does not fit fails before a model loads."""
    for example in examples:
        encode_example(tokenizer, example, max_length)


def _as_ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


@dataclass
class Batches:
    """Right-padded batches with `labels` masked to the response (-100 elsewhere).

    Sized, so progress bars know their total; tokenised lazily, batch by batch.
    """

    tokenizer: object
    examples: list[Example]
    max_length: int
    batch_size: int
    device: torch.device | str = "cpu"

    def __len__(self) -> int:
        return (len(self.examples) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for start in range(0, len(self.examples), self.batch_size):
            chunk = self.examples[start : start + self.batch_size]
            encoded = [encode_example(tokenizer, ex, self.max_length) for ex in chunk]
            width = max(len(ids) for ids, _ in encoded)
            input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
            labels = torch.full((len(encoded), width), -100, dtype=torch.long)
            for row, (ids, prompt_len) in enumerate(encoded):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:], dtype=torch.long)
            yield {
                "input_ids": input_ids.to(self.device),
                "attention_mask": attention_mask.to(self.device),
                "labels": labels.to(self.device),
            }


def write_json_atomically(path: Path, data: dict) -> None:
    """Write to a temporary file and rename: a crash never leaves a partial artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_directory_atomically(out_dir: str | Path, write) -> None:
    """Write into a temporary sibling directory, then swap it in: never a half-written artifact."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
