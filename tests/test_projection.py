"""Projection math and `WeightConstraint` on small torch models (no Axolotl)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cwac_plugin.config import DEFAULT_TARGET_MODULES
from cwac_plugin.projection import WeightConstraint, project_input_side, project_output_side
from cwac_plugin.subspace import Subspace, SubspaceError


def orthonormal(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))
    return q.float()


dims = st.tuples(st.integers(2, 24), st.integers(2, 24)).flatmap(
    lambda d: st.tuples(st.just(d), st.integers(1, d[1]), st.integers(1, d[0]), st.integers(0, 2**31 - 1))
)


@settings(max_examples=60, deadline=None)
@given(dims)
def test_projections_reach_their_targets_and_commute(case):
    (d_out, d_in), k_in, k_out, seed = case
    g = torch.Generator().manual_seed(seed)
    u, v = orthonormal(d_in, k_in, g), orthonormal(d_out, k_out, g)
    x = torch.randn(d_out, d_in, generator=g)

    both = project_output_side(project_input_side(x, u), v)
    assert torch.allclose(both, project_input_side(project_output_side(x, v), u), atol=1e-5)
    assert torch.allclose(both @ u, torch.zeros(d_out, k_in), atol=1e-5)
    assert torch.allclose(v.T @ both, torch.zeros(k_out, d_in), atol=1e-5)
    assert torch.allclose(project_output_side(project_input_side(both, u), v), both, atol=1e-5)  # idempotent
    # orthogonal: what is removed is orthogonal to what is kept
    assert abs(((x - both) * both).sum().item()) < 1e-3 * (1 + x.square().sum().item())

    # with targets from a reference W0 (R = W0 U, Q = V^T W0), dW = X - W0 is projected the same way
    w0 = torch.randn(d_out, d_in, generator=g)
    anchored = project_output_side(project_input_side(x, u, w0 @ u), v, v.T @ w0)
    assert torch.allclose(anchored - w0, project_output_side(project_input_side(x - w0, u), v), atol=1e-4)


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def random_subspace(model: nn.Module, k: int = 4, k_out: int = 3, seed: int = 0) -> Subspace:
    from cwac_plugin.models import find_target_modules, module_dims

    g = torch.Generator().manual_seed(seed)
    inputs, outputs = {}, {}
    for name, module in find_target_modules(model, DEFAULT_TARGET_MODULES).items():
        d_out, d_in = module_dims(module)
        inputs[name] = orthonormal(d_in, k, g)
        if k_out:
            outputs[name] = orthonormal(d_out, k_out, g)
    return Subspace(inputs, outputs, {"model_type": "llama"})


def train_steps(model: nn.Module, optimizer, steps: int, after_step=None) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step:
            after_step()


def current_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Full weights in float64; a PEFT model is merged by PEFT (a copy), not by our code."""
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().double().clone() for n in names}


def measured_leakage(subspace: Subspace, before: dict, model: nn.Module) -> tuple[float, float, float]:
    """||dW||, ||dW U||/||dW|| and ||V^T dW||/||dW||, independently of WeightConstraint."""
    return leakage_between(subspace, before, current_weights(model, subspace.module_names))


def leakage_between(subspace: Subspace, before: dict, after: dict) -> tuple[float, float, float]:
    total = leak_in = leak_out = 0.0
    for name in subspace.module_names:
        delta = after[name] - before[name]
        total += delta.square().sum().item()
        leak_in += (delta @ subspace.input_bases[name].double()).square().sum().item()
        if name in subspace.output_bases:
            leak_out += (subspace.output_bases[name].double().T @ delta).square().sum().item()
    return total**0.5, (leak_in / total) ** 0.5, (leak_out / total) ** 0.5


def initial_weights(model: nn.Module, subspace: Subspace) -> dict:
    return current_weights(model, subspace.module_names)


def test_update_mode_is_exact_under_adamw_full_finetuning():
    model = tiny_llama()
    subspace = random_subspace(model)
    before = initial_weights(model, subspace)
    constraint = WeightConstraint(model, subspace, mode="update")
    constraint.attach()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(model, optimizer, 6, after_step=constraint.enforce)

    norm, leak_in, leak_out = measured_leakage(subspace, before, model)
    assert norm > 1e-2
    assert leak_in < 1e-5 and leak_out < 1e-5
    report = constraint.leakage()
    assert report.input_leakage < 1e-5 and report.output_leakage < 1e-5
    assert report.input_leakage == pytest.approx(leak_in, abs=1e-6)


def test_without_enforcement_adamw_leaks():
    model = tiny_llama()
    subspace = random_subspace(model)
    before = initial_weights(model, subspace)
    constraint = WeightConstraint(model, subspace, mode="update")
    train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 6)
    _, leak_in, leak_out = measured_leakage(subspace, before, model)
    assert leak_in > 0.05 and leak_out > 0.05
    # ||dW|| is estimated from a 64-column sketch of W0 under full fine-tuning: within a few percent
    assert constraint.leakage().input_leakage == pytest.approx(leak_in, rel=0.1)


def test_full_finetuning_holds_no_copy_of_the_weights():
    """Bases, targets and the metric's sketch: every tensor kept is thin, O((d_in + d_out) k)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cwac_plugin.projection import SKETCH_COLUMNS

    # every weight dimension above the sketch's 64 columns, so that a copy of W0 would be caught
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    constraint = WeightConstraint(model, random_subspace(model))
    assert len(constraint._full) == 7
    for full in constraint._full.values():
        tensor = full.weight
        held = [full.sketch, full.initial_sketched, tensor.input_basis, tensor.output_basis, tensor.input_target, tensor.output_target]
        assert all(min(t.shape) <= SKETCH_COLUMNS for t in held if t is not None)


def test_gradient_mode_is_exact_for_sgd_but_not_for_adam():
    for optimizer_cls, exact in ((torch.optim.SGD, True), (torch.optim.Adam, False)):
        model = tiny_llama()
        subspace = random_subspace(model)
        before = initial_weights(model, subspace)
        constraint = WeightConstraint(model, subspace, mode="gradient")
        constraint.attach()
        kwargs = {"momentum": 0.9} if optimizer_cls is torch.optim.SGD else {}
        train_steps(model, optimizer_cls(model.parameters(), lr=1e-1 if exact else 1e-2, **kwargs), 5)
        norm, leak_in, leak_out = measured_leakage(subspace, before, model)
        assert norm > 1e-3
        if exact:
            assert leak_in < 1e-5 and leak_out < 1e-5
        else:
            assert leak_in > 1e-3  # Adam's per-coordinate scaling re-enters the subspace
        constraint.detach()
        assert all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)


@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_lora_factors_are_projected(mode):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    subspace = random_subspace(base)
    before = initial_weights(base, subspace)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGET_MODULES))
    constraint = WeightConstraint(model, subspace, mode=mode)
    constraint.attach()
    if mode == "update":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        train_steps(model, optimizer, 5, after_step=constraint.enforce)
    else:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        train_steps(model, optimizer, 5)
    norm, leak_in, leak_out = measured_leakage(subspace, before, model)
    assert norm > 1e-3
    assert leak_in < 1e-5 and leak_out < 1e-5
    assert constraint.leakage().input_leakage < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_factors_are_projected_with_one_batched_product_per_shape(dtype):
    """Hundreds of small factors cost launches, not arithmetic: a step's projection is one stacked
    product per factor shape, and it is the projection of each factor on its own (in float32)."""
    from peft import LoraConfig, get_peft_model
    from torch.profiler import profile

    base = tiny_llama()
    subspace = random_subspace(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGET_MODULES)).to(dtype)
    constraint = WeightConstraint(model, subspace)
    with torch.no_grad():
        for tensor in constraint.tensors:
            tensor.param.normal_(std=0.05)
    expected = [tensor.project(tensor.param.detach().float()).to(dtype) for tensor in constraint.tensors]
    with profile() as profiler:
        constraint.enforce()
    products = sum(e.count for e in profiler.key_averages() if e.key in ("aten::mm", "aten::bmm", "aten::baddbmm_"))
    shapes = {(t.param.shape, t.input_basis is None) for t in constraint.tensors}
    assert len(constraint.tensors) == 28 and len(shapes) == 5  # A: 32 and 48 (down) wide; B: 32, 16 (k, v), 48 (gate, up) tall
    assert products == 2 * len(shapes)
    assert all(torch.allclose(t.param, e, atol=1e-6) for t, e in zip(constraint.tensors, expected))


def test_unknown_module_and_wrong_shape_are_clear_errors():
    model = tiny_llama()
    basis = orthonormal(32, 2, torch.Generator().manual_seed(0))
    with pytest.raises(SubspaceError, match="does not have.*model.layers.9.self_attn.q_proj"):
        WeightConstraint(model, Subspace({"model.layers.9.self_attn.q_proj": basis}))
    with pytest.raises(SubspaceError, match="computed for another model"):
        WeightConstraint(model, Subspace({"model.layers.0.mlp.down_proj": basis}))  # d_in is 48


def test_nothing_trained_is_an_error():
    model = tiny_llama()
    subspace = random_subspace(model)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(SubspaceError, match="is trained"):
        WeightConstraint(model, subspace)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_lora_is_exact_with_float32_bases(dtype):
    """A bf16/fp16 base with LoRA: bases stay float32 and the (float32) adapters keep the constraint."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama().to(dtype)
    subspace = random_subspace(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGET_MODULES))
    constraint = WeightConstraint(model, subspace)
    assert all(
        basis.dtype == torch.float32
        for t in constraint.tensors
        for basis in (t.input_basis, t.output_basis)
        if basis is not None
    )
    constraint.attach()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, optimizer, 4, after_step=constraint.enforce)
    # dW = s B A from the float32 factors: merging into the rounded base would measure the rounding.
    for name in subspace.module_names:
        module = model.base_model.model.get_submodule(name)
        assert module.lora_A["default"].weight.dtype == torch.float32
        delta = module.scaling["default"] * module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
        assert delta.norm() > 1e-3
        assert (delta @ subspace.input_bases[name].double()).norm() < 1e-5 * delta.norm()
        assert (subspace.output_bases[name].double().T @ delta).norm() < 1e-5 * delta.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_full_finetuning_leaks_only_the_rounding_of_the_weight(dtype):
    """Trained in bf16/fp16, W can only be stored rounded: the leak left is that one rounding.

    The projection runs in float32 against a float32 W0 U, so ||dW U|| <= ||round(W) - W|| <=
    eps/2 ||W|| for every module, whereas the unconstrained run leaks ten times that bound.
    """
    eps = torch.finfo(dtype).eps
    for constrained in (True, False):
        model = tiny_llama().to(dtype)
        subspace = random_subspace(model)
        before = initial_weights(model, subspace)
        constraint = WeightConstraint(model, subspace)
        assert all(t.input_target.dtype == torch.float32 for t in constraint.tensors)
        optimizer = torch.optim.SGD(model.parameters(), lr=5.0, momentum=0.9)  # fp16 Adam state underflows
        train_steps(model, optimizer, 4, constraint.enforce if constrained else None)
        after = current_weights(model, subspace.module_names)
        for name in subspace.module_names:
            leak = ((after[name] - before[name]) @ subspace.input_bases[name].double()).norm().item()
            bound = eps / 2 * after[name].norm().item()
            assert leak <= bound if constrained else leak > 10 * bound, (name, leak, bound)


@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_non_finite_gradients_do_not_touch_the_cached_bases(mode):
    """A NaN/inf step ruins that step's weights (the trainer's business), never the subspace."""
    model = tiny_llama()
    subspace = random_subspace(model)
    constraint = WeightConstraint(model, subspace, mode=mode)
    constraint.attach()
    def cached():
        return [
            value
            for t in constraint.tensors
            for value in (t.input_basis, t.output_basis, t.input_target, t.output_target)
            if value is not None
        ]

    before = [value.clone() for value in cached()]
    ids = torch.randint(0, 64, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss * torch.tensor(float("nan"))
    loss.backward()
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    if mode == "update":
        constraint.enforce()
    assert all(torch.equal(a, b) for a, b in zip(before, cached()))
