"""Where the activation penalty's heavy tail comes from (the activation-constraint issue, diagnosis).

    python benchmarks/act_diagnose.py --config examples/smollm2_cpu/config.yml \\
        --adapter runs/smollm2/cwac-lora --out benchmarks/results/oneoff/act_diagnose.json

Takes the trained adapter of a run (the main job's, after `bash examples/smollm2_cpu/run.sh`), and on
every safety anchor batch of its `cwac` block splits the penalty sum_features ((z - z_ref) / scale)^2
into its (token, feature) cells: which cells carry it, whether they are TopK features switching on
(z_ref = 0 < z) or off, at which positions, and how the per-feature scales they are divided by compare.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cwac", type=json.loads, default={}, help="overrides of the cwac block, as JSON")
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwac_plugin.cli import load_axolotl_config
    from cwac_plugin.data import Batches, write_json_atomically
    from cwac_plugin.plugin import settings_from
    from cwac_plugin.sae import (
        ActivationConstraint,
        FeatureSet,
        load_anchor_examples,
        load_sae,
        run_and_capture,
    )

    cfg = load_axolotl_config(args.config)
    settings = settings_from(cfg)
    settings = type(settings).model_validate({**settings.model_dump(), **args.cwac})
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32), args.adapter)
    model.eval()
    anchors = Batches(tokenizer, load_anchor_examples(settings), settings.max_length or cfg.sequence_len, settings.anchor_batch_size)
    constraint = ActivationConstraint(model, load_sae(settings), FeatureSet.load(settings.features), settings, anchors)
    scale = constraint.scale if constraint.scale is not None else torch.ones(len(constraint.indices))

    cells, switch_on, switch_off, first, batch_losses = [], [], [], [], []
    with torch.no_grad():
        for batch, z_ref in constraint._references:  # the aligned model's, as in training
            z = constraint._encode(run_and_capture(model, constraint.tap, batch))
            mask = batch["attention_mask"].bool()
            contribution = ((z - z_ref) / scale).square()[mask]  # (tokens, features)
            batch_losses.append((contribution.sum() / mask.sum()).item())
            cells.append(contribution)
            switch_on.append(((z_ref == 0) & (z > 0))[mask])
            switch_off.append(((z_ref > 0) & (z == 0))[mask])
            positions = torch.arange(mask.shape[1]).expand_as(mask)[mask]
            first.append((positions == 0).unsqueeze(-1).expand_as(contribution))
    cells, switch_on, switch_off, first = (torch.cat(x) for x in (cells, switch_on, switch_off, first))
    total = cells.sum()
    flat = cells.flatten().sort(descending=True).values
    by_feature = cells.sum(0) / total
    smallest_scales = scale.argsort()[:3]
    result = {
        "anchor_batches": len(batch_losses),
        "batch_loss": {"median": float(torch.tensor(batch_losses).median()), "max": max(batch_losses),
                       "max_over_median": max(batch_losses) / float(torch.tensor(batch_losses).median())},
        "share_of_penalty": {
            "top_1pct_cells": float(flat[: max(1, len(flat) // 100)].sum() / total),
            "top_10_cells": float(flat[:10].sum() / total),
            "features_switching_on": float(cells[switch_on].sum() / total),
            "features_switching_off": float(cells[switch_off].sum() / total),
            "first_position": float(cells[first].sum() / total),
            "top_3_features": float(by_feature.sort(descending=True).values[:3].sum()),
            "3_smallest_scale_features": float(by_feature[smallest_scales].sum()),
        },
        "cells": int(cells.numel()),
        "scale": {"min": float(scale.min()), "median": float(scale.median()), "max": float(scale.max())},
        "settings": {k: getattr(settings, k) for k in ("act_normalize", "act_scale", "act_signal", "act_skip_first", "num_features")},
    }
    write_json_atomically(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
