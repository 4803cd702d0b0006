#!/usr/bin/env bash
# The main job on the real small model, CPU only: align SmolLM2 and lay out the data (prepare.py), build
# the safety data from the aligned model's own refusals and compute its safety subspace, SAE and safety
# features (`cwac prepare`), fine-tune with CWAC on the user task (the harmful score is logged while
# training), verify the saved adapter, and compare the aligned and the fine-tuned model on held-out
# prompts (`cwac eval`, `cwac report`). Run from the repository root inside the activated venv.
set -euo pipefail
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config=examples/smollm2_cpu/config.yml
out=runs/smollm2
python examples/smollm2_cpu/prepare.py --out "$out"
cwac prepare "$config"   # own data, subspace, SAE and features; each skipped on a rerun while up to date
# the held-out prompts must share none with the model's own safety data (its anchors): stop if they do
python -c 'import json, sys; read = lambda f: {json.loads(l)["prompt"] for l in open(f)}
shared = read(sys.argv[1]) & read(sys.argv[2]); sys.exit(f"{len(shared)} eval prompts are safety anchors too" if shared else 0)' \
  "$out/eval_harmful.jsonl" "$out/own_safety.jsonl"
axolotl train "$config"
# the proof from the saved artifacts alone: exits 1 if the adapter's update leaks into the subspace
cwac verify --base "$out/model" --adapter "$out/cwac-lora" --subspace "$out/subspace.safetensors" --out "$out/verify.json"
for model in aligned fine-tuned; do
  adapter=(); [ "$model" = fine-tuned ] && adapter=(--adapter "$out/cwac-lora")
  cwac eval --model "$out/model" ${adapter[@]+"${adapter[@]}"} --prompts "$out/eval_harmful.jsonl" --benign "$out/eval_benign.jsonl" \
    --task "$out/task_eval.jsonl" --task-max-new-tokens 8 --out "$out/eval_$model.json"
done
cwac report --before "$out/eval_aligned.json" --after "$out/eval_fine-tuned.json" --verify "$out/verify.json" --out "$out/report"
echo "Done: adapter in $out/cwac-lora; before/after in $out/report/report.md and report.png."
