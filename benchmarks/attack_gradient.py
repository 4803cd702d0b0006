"""Where the harmful fine-tuning attack's gradient lives, by decoder layer (activation-constraint diagnosis).

    python benchmarks/attack_gradient.py --out benchmarks/results/oneoff/attack_gradient.json   # ~1 min here

The activation penalty reads the residual stream at one hook point, so its gradient reaches only the
layers up to it: what the attack can change in the later layers, the penalty cannot see. This measures,
on the benchmark's aligned model (`harmful_finetune.py`'s work directory) and its attack answers, the
share of the attack's LoRA gradient (squared norm, at the LoRA initialisation the attack starts from) in
each layer.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

WORK = Path(__file__).parent / "results" / "open_aligned" / "work"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=WORK / "aligned_e2")
    parser.add_argument("--attack", type=Path, default=WORK / "attack.json", help="the attack's harmful answers")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--hook-layer", type=int, default=15, help="the penalty's hook point (blocks.L.hook_resid_post)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwac_plugin.data import Batches, Example, write_json_atomically

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(0)  # the attack's seed: the same LoRA initialisation
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    pairs = json.loads(args.attack.read_text())["pairs"][: args.examples]
    per_layer = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64)
    for batch in Batches(tokenizer, [Example(p, a) for p, a in pairs], 192, 8):
        peft_model.zero_grad()
        peft_model(**batch).loss.backward()
        for name, param in peft_model.named_parameters():
            if param.grad is not None:
                per_layer[int(re.search(r"layers\.(\d+)\.", name).group(1))] += param.grad.double().square().sum()
    share = (per_layer / per_layer.sum()).tolist()
    result = {
        "model": str(args.model), "examples": len(pairs), "hook_layer": args.hook_layer,
        "share_up_to_hook": sum(share[: args.hook_layer + 1]), "share_after_hook": sum(share[args.hook_layer + 1 :]),
        "share_by_layer": share,
    }
    write_json_atomically(args.out, result)
    print(f"attack gradient: {result['share_up_to_hook']:.1%} in layers 0-{args.hook_layer}, "
          f"{result['share_after_hook']:.1%} after -> {args.out}")


if __name__ == "__main__":
    main()
