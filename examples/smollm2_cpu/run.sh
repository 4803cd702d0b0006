#!/usr/bin/env bash
# The main job on the real small model, CPU only: prepare model and data, compute the safety
# subspace, train the SAE and pick its safety features (`cwac prepare`), fine-tune with CWAC,
# verify. Run from the repository root inside the activated venv.
set -euo pipefail
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config=examples/smollm2_cpu/config.yml
python examples/smollm2_cpu/prepare.py --out runs/smollm2
cwac prepare "$config"   # subspace, SAE and features; each skipped on a rerun while up to date
axolotl train "$config"
# the proof from the saved artifacts alone: exits 1 if the adapter's update leaks into the subspace
cwac verify --base runs/smollm2/model --adapter runs/smollm2/cwac-lora --subspace runs/smollm2/subspace.safetensors
echo "Done: adapter in runs/smollm2/cwac-lora (with cwac_report.json); cwac/leakage and cwac/feature_drift were logged at every step above."
