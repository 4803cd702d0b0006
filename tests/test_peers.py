"""The benchmark's peer defences (benchmarks/peers.py) against their reference's definition."""

import random
import sys
from pathlib import Path

import pytest
import torch

from test_projection import tiny_llama

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from peers import (
    Lisa,
    alignment_directions,
    asft_penalty,
    install_asft,
    install_lisa,
    mixed_with_safety,
    safelora_project,
)


def lora_trained(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return peft_model


def base_and_aligned(scale=0.05):
    """A tiny model and its "alignment": each LoRA-targeted weight moved along a few directions."""
    base, aligned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, module in aligned.named_modules():
            if name.endswith(("q_proj", "v_proj", "down_proj")):
                module.weight += scale * torch.randn(module.weight.shape[0], 2, generator=g) @ torch.randn(2, module.weight.shape[1], generator=g)
    return base, aligned


def reference_c(base, aligned, name):
    """The reference's C of one module, formed whole."""
    v = dict(aligned.named_modules())[name].weight - dict(base.named_modules())[name].weight
    return v @ v.T / torch.linalg.norm(v)


def test_safelora_replaces_b_by_c_b_in_the_least_similar_modules_only():
    base, aligned = base_and_aligned()
    peft_model = lora_trained(tiny_llama(seed=0))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    result = safelora_project(peft_model, base, aligned, num_proj_layers=3)

    assert len(result["projected"]) == 3 and len(result["cosines"]) == 6
    assert sorted(result["cosines"].values())[2] == result["threshold"]
    modules = dict(peft_model.get_base_model().named_modules())
    for name, cos in result["cosines"].items():
        c = reference_c(base, aligned, name)
        b0, a = before[f"base_model.model.{name}.lora_B.default.weight"], before[f"base_model.model.{name}.lora_A.default.weight"]
        expected = torch.nn.functional.cosine_similarity((c @ b0 @ a).reshape(1, -1), (b0 @ a).reshape(1, -1)).item()
        assert cos == pytest.approx(expected, abs=1e-4)
        b = modules[name].lora_B["default"].weight
        assert torch.allclose(b, c @ b0, atol=1e-6) if name in result["projected"] else torch.equal(b, b0)
        assert torch.equal(modules[name].lora_A["default"].weight, a)  # A is never touched


def test_safelora_threshold_mode_projects_every_module_at_or_below_it():
    base, aligned = base_and_aligned()
    cosines = safelora_project(lora_trained(tiny_llama(seed=0)), base, aligned, num_proj_layers=6)["cosines"]
    threshold = sorted(cosines.values())[3]
    result = safelora_project(lora_trained(tiny_llama(seed=0)), base, aligned, threshold=threshold)
    assert sorted(result["projected"]) == sorted(name for name, cos in cosines.items() if cos <= threshold)
    assert len(result["projected"]) == 4
    with pytest.raises(ValueError, match="not both"):
        safelora_project(lora_trained(tiny_llama(seed=0)), base, aligned, num_proj_layers=3, threshold=0.5)


def test_lisa_through_the_trainer_trains_on_alignment_batches_in_place_of_user_ones(tmp_path):
    from transformers import Trainer, TrainingArguments

    def example(marker):  # the first token says whose batch reached the loss
        ids = torch.tensor([marker] + [5] * 7)
        return {"input_ids": ids, "labels": ids}

    def collate(rows):
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=10, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=100, remove_unused_columns=False,
    )
    model = lora_trained(tiny_llama(seed=0))
    trainer = Trainer(model=model, args=args, train_dataset=[example(1) for _ in range(40)], data_collator=collate)
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, **kwargs):
        seen.append(int(inputs["input_ids"][0, 0]))
        return original(model, inputs, **kwargs)

    trainer.compute_loss = spy
    lisa = install_lisa(trainer, [example(2) for _ in range(6)], seed=0, alignment_steps=1, finetune_steps=4, rho=1.0)
    initial = {n: p.detach().clone() for n, p in lisa.params.items()}
    trainer.train()

    assert seen == [2, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert lisa.steps == 10 and lisa.status == "finetune"
    assert any(not torch.equal(p, initial[n]) for n, p in lisa.params.items())  # the optimizer stepped them
    trainer.args.gradient_accumulation_steps = 2
    with pytest.raises(ValueError, match="gradient_accumulation_steps 1"):
        install_lisa(trainer, [example(2) for _ in range(6)], seed=0)


def test_safety_mixing_adds_the_share_asked():
    mix, safety = list(range(90)), [f"refusal {i}" for i in range(50)]
    mixed = mixed_with_safety(mix, safety, 0.1, random.Random(0))
    assert len(mixed) == 100 and sum(isinstance(x, str) for x in mixed) == 10


def test_asft_penalty_is_the_references_and_reaches_the_trainer_loss():
    base, aligned = base_and_aligned(scale=0.5)  # large enough that C is far from 0
    peft_model = lora_trained(tiny_llama(seed=0))
    expected = 0.0
    for name, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta_w = module.lora_B["default"].weight @ module.lora_A["default"].weight
            c = reference_c(base, aligned, name)
            expected += 2.0 * torch.norm((torch.eye(c.shape[0]) - c) @ delta_w, p="fro") ** 2
    modules = {name: m for name, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    penalty = asft_penalty(modules, alignment_directions(peft_model, base, aligned), lam=2.0)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    weight_decay = 2.0 * sum(  # what the term would be with C = 0: it must not be that
        torch.norm(m.lora_B["default"].weight @ m.lora_A["default"].weight) ** 2
        for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert abs(expected - weight_decay) > 0.05 * weight_decay
    # a module the alignment left alone (V = 0, the reference's C NaN): C = 0, its whole update penalised
    untouched = {name: torch.zeros_like(v) for name, v in alignment_directions(peft_model, base, aligned).items()}
    assert asft_penalty(modules, untouched, lam=2.0).item() == pytest.approx(weight_decay.item(), rel=1e-5)

    class Trainer:  # the part of the HF Trainer that install_asft touches
        model = peft_model
        args = type("Args", (), {"gradient_accumulation_steps": 1})

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return torch.tensor(1.5)

    trainer = Trainer()
    install_asft(trainer, base, aligned, lam=2.0)
    peft_model.train()
    loss = trainer.compute_loss(peft_model, {}, num_items_in_batch=8)
    assert loss.item() == pytest.approx(1.5 + expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_A" in n)
    peft_model.eval()
    assert trainer.compute_loss(peft_model, {}).item() == 1.5  # evaluation losses stay the task's


def test_lisa_alternates_one_alignment_step_in_ten_and_pulls_towards_the_other_state():
    w = torch.nn.Parameter(torch.zeros(2))
    lisa = Lisa({"w": w}, iter(f"A{i}" for i in range(10)), total_steps=30, alignment_steps=1, finetune_steps=9, rho=2.0)
    used, proximal, weights = [], [], []
    for step in range(30):
        used.append(lisa.inputs(f"U{step}"))
        proximal.append(float(torch.as_tensor(lisa.proximal()).detach()))
        lisa.stepped()
        with torch.no_grad():  # the optimizer's step: a move the proximal term can see
            w += torch.tensor([1.0, -1.0])
        weights.append(w.detach().clone())

    # the reference starts in alignment; each alignment batch takes a user batch's place
    assert [i for i, batch in enumerate(used) if batch.startswith("A")] == [0, 10, 20]
    assert used[:3] == ["A0", "U1", "U2"] and used[10] == "A1" and len(set(used)) == 30
    assert proximal[:4] == [0.0] * 4  # none in the first 10% of steps (steps <= 3)
    # step 5 fine-tunes; the alignment state was last left at step 1's switch, after one optimizer step
    assert proximal[5] == pytest.approx(2.0 / 2 * torch.sum((weights[4] - weights[0]) ** 2).item())
    # step 10 aligns, pulled towards the fine-tuning state it left there (the weights after step 9)
    assert proximal[10] == pytest.approx(0.0)
    assert proximal[11] == pytest.approx(0.0)  # back to fine-tuning at the alignment state it just left
    assert proximal[12] == pytest.approx(2.0 / 2 * torch.sum((weights[11] - weights[10]) ** 2).item())

