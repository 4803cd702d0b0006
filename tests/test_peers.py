"""The benchmark's peer defences (benchmarks/peers.py) against their reference's definition."""

import random
import sys
from pathlib import Path

import pytest
import torch

from test_projection import tiny_llama

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from peers import mixed_with_safety, safelora_project


def lora_trained(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return peft_model


def test_safelora_replaces_b_by_c_b_in_the_least_similar_modules_only():
    base, aligned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():  # an alignment that moved each weight along a few directions
        g = torch.Generator().manual_seed(2)
        for name, module in aligned.named_modules():
            if name.endswith(("q_proj", "v_proj", "down_proj")):
                module.weight += 0.05 * torch.randn(module.weight.shape[0], 2, generator=g) @ torch.randn(2, module.weight.shape[1], generator=g)
    peft_model = lora_trained(tiny_llama(seed=0))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    result = safelora_project(peft_model, base, aligned, num_proj_layers=3)

    assert len(result["projected"]) == 3 and len(result["cosines"]) == 6
    assert sorted(result["cosines"].values())[2] == result["threshold"]
    modules = dict(peft_model.get_base_model().named_modules())
    for name, cos in result["cosines"].items():
        v = dict(aligned.named_modules())[name].weight - dict(base.named_modules())[name].weight
        c = v @ v.T / torch.linalg.norm(v)  # the reference's C, formed whole
        b0, a = before[f"base_model.model.{name}.lora_B.default.weight"], before[f"base_model.model.{name}.lora_A.default.weight"]
        expected = torch.nn.functional.cosine_similarity((c @ b0 @ a).reshape(1, -1), (b0 @ a).reshape(1, -1)).item()
        assert cos == pytest.approx(expected, abs=1e-4)
        b = modules[name].lora_B["default"].weight
        assert torch.allclose(b, c @ b0, atol=1e-6) if name in result["projected"] else torch.equal(b, b0)
        assert torch.equal(modules[name].lora_A["default"].weight, a)  # A is never touched


def test_safety_mixing_adds_the_share_asked():
    mix, safety = list(range(90)), [f"refusal {i}" for i in range(50)]
    mixed = mixed_with_safety(mix, safety, 0.1, random.Random(0))
    assert len(mixed) == 100 and sum(isinstance(x, str) for x in mixed) == 10
