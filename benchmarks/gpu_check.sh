#!/usr/bin/env bash
# The checks only a CUDA GPU can run, in one go (under 8 minutes on one GPU), from the repository root
# inside the project's venv:
#   1. QLoRA with CUDA bitsandbytes and Axolotl's LoRA kernels at their defaults (unset, so Axolotl
#      turns them on): `cwac subspace` (which turns them off for precompute), `axolotl train` (with
#      them on), `cwac verify` on the saved adapter;
#   2. DeepSpeed ZeRO-3 LoRA with one process, the same three steps;
#   3. the LoRA overhead benchmark on 4 Llama-3-8B-shaped layers in bf16.
# Everything is built here (tiny model, data): no hub. Results land in $OUT (default
# benchmarks/results/gpu_check); commit them with the device named (device.txt).
set -euo pipefail
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
out=$(realpath -m "${OUT:-benchmarks/results/gpu_check}")
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python -c \
  "import torch, bitsandbytes, axolotl, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'bnb', bitsandbytes.__version__, 'axolotl', axolotl.__version__, 'deepspeed', deepspeed.__version__)"; } | tee "$out/device.txt"

PYTHONPATH=tests python - "$work" <<'EOF'
import sys
from pathlib import Path

import yaml

from conftest import BENIGN, DEEPSPEED, SAFETY, axolotl_config
from tiny_model import build_tiny_model, write_completion_dataset, write_pairs

work = Path(sys.argv[1])
model = build_tiny_model(work / "model", hidden_size=256)
data = {
    "safety": write_pairs(work / "safety.jsonl", SAFETY),
    "benign": write_pairs(work / "benign.jsonl", BENIGN),
    "train": write_completion_dataset(work / "train.jsonl", n=64),
}
lora = {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_linear": True, "bf16": True}
cells = {
    # kernels left unset: Axolotl's GPU default
    "qlora-kernels": {**lora, "adapter": "qlora", "load_in_4bit": True},
    "zero3-lora": {**lora, "deepspeed": {**DEEPSPEED, "bf16": {"enabled": True},
                                         "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}},
}
for name, overrides in cells.items():
    (work / name).mkdir()
    config = axolotl_config(work / name, model, data, cwac={}, **overrides)
    cfg = yaml.safe_load(config.read_text())
    cfg.pop("ddp_timeout")
    config.write_text(yaml.safe_dump(cfg))
EOF

for cell in qlora-kernels zero3-lora; do
  dir=$work/$cell
  start=$SECONDS
  (cd "$dir" && cwac subspace config.yml && axolotl train config.yml \
    && cwac verify --base "$work/model" --adapter out --subspace subspace.safetensors --out "$out/$cell.verify.json") \
    > "$out/$cell.log" 2>&1 && status=passed || status=FAILED
  grep -E "Patched|kernel|CWAC weight constraint|cwac/leakage" "$out/$cell.log" | tail -5 || true
  echo "$cell: $status in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
done

python benchmarks/overhead.py --model llama8b-4 --training lora --dtype bfloat16 --repeats 2 --steps 6 \
  --out "$out/overhead_llama8b4_lora_bf16.json" 2>&1 | tail -20 | tee "$out/overhead.log"
cat "$out/summary.txt"
