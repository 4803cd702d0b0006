"""One-off costs of CWAC, per token, and how they grow with model width and protected modules.

    python benchmarks/oneoff.py --out benchmarks/results/oneoff/sweep.json
    python benchmarks/oneoff.py --model runs/smollm2/model --safety runs/smollm2/safety.jsonl \
        --contrast runs/smollm2/benign.jsonl --repeats 3 --out benchmarks/results/oneoff/smollm2.json

Times the library functions behind `cwac subspace` (compute_subspace, the default gradient method with the
contrast set), `cwac train-sae` (train_sae: activation collection plus sae-lens training) and
`cwac features` (select_features), without model loading, against a yardstick: one epoch of LoRA
training (r 16 on every projection, AdamW, same batch size) over the same safety and contrast
tokens. The target of issue #5 is subspace <= that epoch.

Without --model: random 4-layer Llamas (vocab 512, a character-level toy tokenizer, 64 synthetic
prompt/response pairs per set) swept over hidden width (128, 256, 512, 1024; all 7 projections
per layer) and over the number of protected modules (width 256; 1, 3 or 7 projections per layer
in 1, 2 or 4 layers); the exponent is the least-squares slope of log time against log size.
With --llama8b-layers N: the subspace against its epoch on N random layers of Llama-3-8B's shape
(32 + 32 synthetic pairs; no SAE: its cost at that width is sae-lens's, not ours).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from cwac_plugin.config import DEFAULT_TARGET_MODULES, CWACConfig
from cwac_plugin.data import Batches, Example, load_examples, write_json_atomically

from toy import ToyTokenizer, llama8b_shaped, random_llama

SWEEP_WIDTHS = (128, 256, 512, 1024)
WORDS = "how do i make a weapon hack steal poison attack tell me about the sea bread recipe capital of france".split()


def synthetic_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [
        Example(" ".join(rng.choice(WORDS) for _ in range(12)), " ".join(rng.choice(WORDS) for _ in range(12)))
        for _ in range(n)
    ]


def sweep_data(pairs: int = 64) -> tuple[list[Example], list[Example]]:
    """The safety and contrast sets of the random-Llama runs."""
    return synthetic_examples(pairs, 0), synthetic_examples(pairs, 1)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def token_count(tokenizer, examples: list[Example], max_length: int) -> int:
    return sum(int(batch["attention_mask"].sum()) for batch in Batches(tokenizer, examples, max_length, 64))


def lora_epoch_seconds(model, tokenizer, examples: list[Example], max_length: int, batch_size: int) -> float:
    """The yardstick: one LoRA epoch over `examples`, on a copy of the model."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, target_modules=DEFAULT_TARGET_MODULES))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    device = next(model.parameters()).device

    def epoch():
        for batch in Batches(tokenizer, examples, max_length, batch_size, device):
            peft_model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    return timed(epoch)[0]


def measure(model, tokenizer, safety, contrast, cfg: CWACConfig, max_length: int, with_sae: bool) -> dict:
    from cwac_plugin.models import find_target_modules
    from cwac_plugin.sae import select_features, train_sae
    from cwac_plugin.subspace import SubspaceData, compute_subspace

    tokens = token_count(tokenizer, safety + contrast, max_length)
    row = {
        "protected_modules": len(find_target_modules(model, cfg.target_modules, cfg.layers)),
        "hidden_size": model.config.hidden_size,
        "tokens": tokens,
    }
    row["subspace_seconds"], _ = timed(
        lambda: compute_subspace(model, tokenizer, cfg, max_length, SubspaceData(safety, contrast))
    )
    row["lora_epoch_seconds"] = lora_epoch_seconds(model, tokenizer, safety + contrast, max_length, cfg.batch_size)
    row["subspace_over_epoch"] = row["subspace_seconds"] / row["lora_epoch_seconds"]
    if with_sae:
        with tempfile.TemporaryDirectory() as tmp:
            row["train_sae_seconds"], _ = timed(
                lambda: train_sae(model, tokenizer, cfg, safety + contrast, max_length, Path(tmp) / "sae")
            )
            from sae_lens import SAE

            sae = SAE.load_from_disk(Path(tmp) / "sae")
        row["features_seconds"], _ = timed(
            lambda: select_features(model, tokenizer, sae, cfg, safety, contrast, max_length)
        )
        row["sae_training_tokens"] = cfg.sae_training_tokens
        row["features_ms_per_token"] = 1000 * row["features_seconds"] / tokens
    row["subspace_ms_per_token"] = 1000 * row["subspace_seconds"] / tokens
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def repeated(repeats: int, model, tokenizer, safety, contrast, cfg: CWACConfig, max_length: int, with_sae: bool) -> dict:
    """The subspace and its yardstick epoch timed `repeats` times (the SAE, if at all, once)."""
    runs = [
        measure(model, tokenizer, safety, contrast, cfg, max_length, with_sae=with_sae and run == 0)
        for run in range(repeats)
    ]
    return {"model": runs[0], "subspace_over_epoch_runs": [run["subspace_over_epoch"] for run in runs]}


def slope(rows: list[dict], x: str, y: str) -> float:
    """Least-squares exponent b in y ~ x^b."""
    xs = [math.log(r[x]) for r in rows]
    ys = [math.log(r[y]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model directory; without it, the random-Llama sweeps")
    parser.add_argument("--safety", type=Path, help="safety jsonl (with --model)")
    parser.add_argument("--contrast", type=Path, help="contrast jsonl (with --model)")
    parser.add_argument("--llama8b-layers", type=int, help="without --model: N layers of Llama-3-8B's shape instead of the sweeps")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="with --model or --llama8b-layers: time the subspace and its yardstick epoch this many times (the SAE once)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        layers = model.config.num_hidden_layers
        cfg = CWACConfig(
            subspace="unused", safety_data=str(args.safety), contrast_data=str(args.contrast),
            hook_point=f"blocks.{layers // 2}.hook_resid_post", sae_training_tokens=200_000,
        )
        safety = load_examples(args.safety, "--safety")
        contrast = load_examples(args.contrast, "--contrast")
        result |= repeated(args.repeats, model, tokenizer, safety, contrast, cfg, args.max_length, with_sae=True)
    elif args.llama8b_layers:
        model = llama8b_shaped(args.llama8b_layers)
        safety, contrast = sweep_data(32)
        cfg = CWACConfig(subspace="unused")
        result |= repeated(args.repeats, model, ToyTokenizer(), safety, contrast, cfg, args.max_length, with_sae=False)
        result["model"] |= {"layers": args.llama8b_layers, "vocab_size": model.config.vocab_size}
    else:
        tokenizer = ToyTokenizer()
        safety, contrast = sweep_data()
        base = {"subspace": "unused", "hook_point": "blocks.2.hook_resid_post", "sae_training_tokens": 50_000}
        width_rows = [
            measure(random_llama(hidden), tokenizer, safety, contrast, CWACConfig(**base), args.max_length, with_sae=True)
            for hidden in SWEEP_WIDTHS
        ]
        module_rows = []
        model = random_llama(256)
        for targets in (DEFAULT_TARGET_MODULES[:1], DEFAULT_TARGET_MODULES[:3], DEFAULT_TARGET_MODULES):
            for layers in ([0], [0, 1], [0, 1, 2, 3]):
                cfg = CWACConfig(**base, target_modules=targets, layers=layers)
                module_rows.append(measure(model, tokenizer, safety, contrast, cfg, args.max_length, with_sae=False))
        result |= {
            "width_sweep": width_rows,
            "module_sweep": module_rows,
            "exponents": {
                "subspace_vs_width": slope(width_rows, "hidden_size", "subspace_seconds"),
                "train_sae_vs_width": slope(width_rows, "hidden_size", "train_sae_seconds"),
                "features_vs_width": slope(width_rows, "hidden_size", "features_seconds"),
                "lora_epoch_vs_width": slope(width_rows, "hidden_size", "lora_epoch_seconds"),
                "subspace_vs_modules": slope(module_rows, "protected_modules", "subspace_seconds"),
            },
        }
        print(result["exponents"])
    write_json_atomically(args.out, result)


if __name__ == "__main__":
    main()
