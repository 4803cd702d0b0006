"""Defences CWAC is compared with, as the benchmark runs them (not part of the plugin).

SafeLoRA (Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large
Language Models"; reference code IBM/SafeLoRA, Apache-2.0, `model.py` at d81fda1): after fine-tuning,
each LoRA module's B is replaced by C B, with C = V V^T / ||V||_F and V = W_aligned - W_base of that
module, in the modules whose update changes most under it: the `num_proj_layers` (default 10) with the
lowest cosine similarity between C B A and B A (the reference's default `select_layers_type="number"`;
`threshold` mode projects every module at or below a cosine instead). As in the reference, C is V V^T
divided by ||V||_F, not by its square (so not idempotent), A is left alone and the LoRA scaling plays no
part in the cosine. Deviations, none of which changes the result: base and aligned weights are paired by
module name instead of by parameter order; C B is computed as V (V^T B) / ||V||_F without forming the
d_out x d_out matrix C; everything in float32.
"""

from __future__ import annotations

import torch
from torch import nn


def _lora_modules(peft_model: nn.Module) -> dict[str, nn.Module]:
    base = peft_model.get_base_model()
    return {name: m for name, m in base.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@torch.no_grad()
def safelora_project(
    peft_model: nn.Module,
    base_model: nn.Module,
    aligned_model: nn.Module,
    num_proj_layers: int | None = 10,
    threshold: float | None = None,
) -> dict:
    """Project the fine-tuned adapter in place; returns each module's cosine and which were projected."""
    if (num_proj_layers is None) == (threshold is None):
        raise ValueError("pass one of num_proj_layers (the reference's default mode) or threshold")
    if num_proj_layers is not None and num_proj_layers < 1:
        raise ValueError("num_proj_layers must be at least 1")
    base = dict(base_model.named_modules())
    aligned = dict(aligned_model.named_modules())
    projected_b, cosines = {}, {}
    for name, module in _lora_modules(peft_model).items():
        v = (aligned[name].weight.float() - base[name].weight.float()).to(module.lora_B["default"].weight.device)
        a = module.lora_A["default"].weight.float()
        b = module.lora_B["default"].weight.float()
        if not v.any():  # alignment left it alone: C = 0/0 (NaN in the reference); nothing to project onto
            cosines[name] = 1.0
            continue
        cb = v @ (v.T @ b) / torch.linalg.norm(v)
        update, changed = b @ a, cb @ a
        cosines[name] = round(torch.nn.functional.cosine_similarity(changed.reshape(1, -1), update.reshape(1, -1)).item(), 5)
        projected_b[name] = cb
    if threshold is None:
        threshold = sorted(cosines.values())[: num_proj_layers][-1]
    chosen = [name for name, cos in cosines.items() if cos <= threshold and name in projected_b]
    modules = _lora_modules(peft_model)
    for name in chosen:
        weight = modules[name].lora_B["default"].weight
        weight.copy_(projected_b[name].to(weight.dtype))
    return {"threshold": threshold, "cosines": cosines, "projected": chosen}


def mixed_with_safety(mix: list, safety: list, share: float, rng) -> list:
    """Safety-data mixing (the practitioners' baseline; SafeInstr): refusal examples make up `share` of
    the fine-tuning data, added to it, shuffled in."""
    added = rng.sample(safety, min(len(safety), round(share * len(mix) / (1 - share))))
    mixed = mix + added
    rng.shuffle(mixed)
    return mixed
