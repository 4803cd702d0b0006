"""The configurations in which the weight constraint used to be silently off or weakened.

Each case ends protected (measured on the weights the model runs) or refused before the first step
with the key at fault named. Against the code before these guards, every test here failed:
the constraint bound stale tensors under FSDP2, `cwac subspace` skipped kernel-patched modules,
PiSSA's start lost the protected directions, Phi-3's fused modules and Mixtral's experts trained
unprotected, a 4-bit file passed for a float model, and DeepSpeed's bf16 copies went unmeasured.
"""

import contextlib
import socket

import pytest
import torch
from torch import nn

from cwac_plugin.config import DEFAULT_TARGET_MODULES, CWACConfig
from cwac_plugin.data import Example
from cwac_plugin.guards import MIN_COVERAGE, refuse_unsupported
from cwac_plugin.models import find_target_modules
from cwac_plugin.projection import WeightConstraint
from cwac_plugin.subspace import Subspace, SubspaceData, SubspaceError, compute_subspace

from test_projection import initial_weights, measured_leakage, random_subspace, tiny_llama, train_steps
from test_sae import ToyTokenizer


def lora(model: nn.Module, **kwargs) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=DEFAULT_TARGET_MODULES, task_type="CAUSAL_LM", **kwargs))


@contextlib.contextmanager
def one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_parameters_replaced_after_construction_are_refused():
    """A wrapper that swaps parameters after the plugin built the constraint (as FSDP2's fully_shard
    does at accelerator.prepare) would leave it projecting tensors nobody trains."""
    model = tiny_llama()
    constraint = WeightConstraint(model, random_subspace(model))
    constraint.check_bound(model, torch.optim.AdamW(model.parameters()))  # still bound: fine
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight = nn.Parameter(q_proj.weight.detach().clone())
    with pytest.raises(SubspaceError, match="no longer"):
        constraint.check_bound(model, torch.optim.AdamW(model.parameters()))


def test_fsdp2_shards_are_followed():
    """The repro of ../shared/repro/fsdp2.py: after fully_shard the constraint re-binds to the
    DTensors the optimizer steps (two-process training: test_fsdp2.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    constraint = WeightConstraint(model, random_subspace(model))
    with one_process_group():
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        optimizer = torch.optim.AdamW(model.parameters())
        with pytest.raises(SubspaceError, match="no longer"):
            constraint.check_bound(model, optimizer)
        constraint.follow_sharding()
        constraint.check_bound(model, optimizer)
        assert constraint.sharded


def test_tensors_the_optimizer_does_not_step_are_refused():
    model = tiny_llama()
    constraint = WeightConstraint(model, random_subspace(model))
    others = [p for name, p in model.named_parameters() if "proj" not in name]
    with pytest.raises(SubspaceError, match="the optimizer steps"):
        constraint.check_bound(model, torch.optim.AdamW(others))


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"fsdp_version": 1, "fsdp_config": {"reshard_after_forward": True}}, "fsdp_version"),
        ({"fsdp_config": {"reshard_after_forward": True}}, "fsdp_version"),
        ({"fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}}, "cpu_ram_efficient_loading"),
        ({"fsdp": ["full_shard"]}, "fsdp"),
        ({"fsdp_version": 2, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}}, "final_state_dict_type"),
        ({"fsdp_version": 2, "fsdp_config": {}, "tensor_parallel_size": 2}, "tensor_parallel_size"),
        ({"fsdp_version": 2, "fsdp_config": {}, "dp_replicate_size": 2}, "dp_replicate_size"),
        ({"adapter": "lora", "relora": True}, "relora"),
        ({"adapter": "lora", "peft_init_lora_weights": "pissa"}, "peft_init_lora_weights"),
        ({"adapter": "lora", "peft_init_lora_weights": "olora"}, "peft_init_lora_weights"),
        ({"adapter": "lora", "peft_init_lora_weights": False}, "peft_init_lora_weights"),
        ({"adapter": "qlora", "peft": {"loftq_config": {"loftq_bits": 4}}}, "loftq_config"),
        ({"adapter": "lora", "peft_use_dora": True}, "peft_use_dora"),
    ],
)
def test_settings_the_constraint_cannot_follow_are_refused_naming_the_key(cfg, key):
    with pytest.raises(SubspaceError, match=key):
        refuse_unsupported(cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"adapter": "lora"},
        {"adapter": "lora", "peft_init_lora_weights": "gaussian"},
        {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}},
        {"fsdp_config": {"fsdp_version": 2}},
    ],
)
def test_zero_start_adapters_and_full_finetuning_are_accepted(cfg):
    refuse_unsupported(cfg)


@pytest.mark.parametrize("init", ["pissa", "olora", False, "trained"])
def test_an_adapter_that_does_not_start_at_zero_is_refused(init):
    """PiSSA and OLoRA move B0 A0 out of the base weight; projecting A0 would remove the protected
    part of the effective weight before the first step, invisibly to a metric on s B A. A trained
    adapter (lora_model_dir) is part of the model to keep, not of the update."""
    model = lora(tiny_llama(), **({} if init == "trained" else {"init_lora_weights": init}))
    if init == "trained":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.01)
    with pytest.raises(SubspaceError, match="does not start at zero.*peft_init_lora_weights.*lora_model_dir"):
        WeightConstraint(model, random_subspace(model))


def test_a_saved_zero_initialisation_is_accepted():
    WeightConstraint(lora(tiny_llama()), random_subspace(tiny_llama()))


def apply_axolotl_lora_kernels(model: nn.Module, model_dir) -> None:
    """Axolotl's own qkv/o kernel patches (its GPU default for LoRA); they run on CPU too."""
    from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches, patch_self_attn_lora
    from axolotl.utils.dict import DictDefault

    model.config.save_pretrained(model_dir)
    cfg = DictDefault({"model_config_type": "llama", "base_model": str(model_dir), "lora_qkv_kernel": True, "lora_o_kernel": True})
    patch_self_attn_lora(cfg)
    apply_lora_kernel_patches(model, DictDefault({**cfg, "lora_mlp_kernel": False}))


@contextlib.contextmanager
def axolotl_attention_patch():
    """patch_self_attn_lora rewrites LlamaAttention.forward for the whole process: undo it after."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    forward = LlamaAttention.forward
    try:
        yield
    finally:
        LlamaAttention.forward = forward
        if hasattr(LlamaAttention, "_original_forward"):
            del LlamaAttention._original_forward


def test_a_module_whose_forward_is_bypassed_fails_the_subspace(tmp_path):
    """The kernels skip lora.Linear's forward: q/k/v/o's input hooks never fire. Before, the file
    silently left them out; now the run stops naming them (and `cwac subspace` turns kernels off)."""
    model = lora(tiny_llama())
    examples = [Example(f"how do i make a bomb {i}", "sorry i cannot help") for i in range(4)]
    cfg = CWACConfig(subspace="s.safetensors", rank=2, output_rank=2, subspace_method="activation")
    with axolotl_attention_patch():
        apply_axolotl_lora_kernels(model, tmp_path)
        with pytest.raises(SubspaceError, match="saw no tokens.*lora_qkv_kernel"):
            compute_subspace(model, ToyTokenizer(), cfg, 32, SubspaceData(examples))


def test_training_with_axolotl_lora_kernels_on_holds(tmp_path):
    """What GPU users run by default: the fused qkv/o forward and backward train the same A and B
    tensors, which update mode projects after each step."""
    base = tiny_llama()
    subspace = random_subspace(base)
    before = initial_weights(base, subspace)
    model = lora(base)
    with axolotl_attention_patch():
        apply_axolotl_lora_kernels(model, tmp_path)
        attention = model.base_model.model.model.layers[0].self_attn
        assert hasattr(attention, "apply_qkv")  # the patched forward is the one that runs
        constraint = WeightConstraint(model, subspace)
        constraint.attach()
        trainable = [p for p in model.parameters() if p.requires_grad]
        train_steps(model, torch.optim.AdamW(trainable, lr=1e-2), 4, after_step=constraint.enforce)
    q_a = attention.q_proj.lora_A["default"].weight
    assert q_a.grad is None and q_a.abs().sum() > 0  # trained through the kernel (zero_grad'd after)
    norm, leak_in, leak_out = measured_leakage(subspace, before, model)
    assert norm > 1e-3 and leak_in < 1e-5 and leak_out < 1e-5
    assert constraint.leakage().input_leakage < 1e-5


def phi3(num_layers: int = 2) -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                                      num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1))


def mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, num_local_experts=4))


def test_fused_projections_are_protected_by_default():
    """Phi-3's qkv_proj and gate_up_proj are plain linear modules: the default targets take them."""
    model = phi3()
    protected = {name.rsplit(".", 1)[-1] for name in find_target_modules(model, DEFAULT_TARGET_MODULES)}
    assert protected == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    subspace = random_subspace(model)
    before = initial_weights(model, subspace)
    constraint = WeightConstraint(model, subspace)
    assert constraint.coverage.share > 0.99
    train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 3, after_step=constraint.enforce)
    norm, leak_in, leak_out = measured_leakage(subspace, before, model)
    assert norm > 1e-3 and leak_in < 1e-5 and leak_out < 1e-5


def test_unprotected_expert_weights_are_refused_unless_allowed():
    """Mixtral's experts are 3-D parameters, not linear modules: most of the decoder, unprotected."""
    model = mixtral()
    subspace = random_subspace(model)
    with pytest.raises(SubspaceError, match="cwac.target_modules.*experts.*cwac.allow_partial"):
        WeightConstraint(model, subspace)
    constraint = WeightConstraint(model, subspace, allow_partial=True)
    assert constraint.coverage.share < MIN_COVERAGE
    assert any("experts" in name for name in constraint.coverage.unprotected)


def test_a_layer_subset_is_partial_coverage():
    model = tiny_llama()
    first_layer = Subspace({k: v for k, v in random_subspace(model).input_bases.items() if ".layers.0." in k})
    with pytest.raises(SubspaceError, match="only 49.6%"):
        WeightConstraint(model, first_layer)


def test_a_subspace_from_other_precision_weights_is_refused_unless_allowed():
    model = tiny_llama()
    subspace = random_subspace(model)
    subspace.metadata["weights"] = "bnb-4bit"
    with pytest.raises(SubspaceError, match="bnb-4bit weights, this model's are float32.*allow_precision_mismatch"):
        WeightConstraint(model, subspace)
    assert "bnb-4bit" in WeightConstraint(model, subspace, allow_precision_mismatch=True).precision_mismatch
    subspace.metadata["weights"] = "float32"
    assert WeightConstraint(model, subspace).precision_mismatch is None


def test_the_subspace_file_records_the_weights_precision():
    model = lora(tiny_llama().to(torch.bfloat16))
    examples = [Example(f"how do i make a bomb {i}", "sorry i cannot help") for i in range(4)]
    cfg = CWACConfig(subspace="s.safetensors", rank=2, output_rank=2, subspace_method="activation")
    assert compute_subspace(model, ToyTokenizer(), cfg, 32, SubspaceData(examples)).metadata["weights"] == "bfloat16"


def test_leakage_reads_the_weights_the_model_runs_not_the_optimizers_master(monkeypatch):
    """DeepSpeed's fp32 master is projected exactly; the bf16 copy the forward runs and a save writes
    is its rounding. The metric must describe the latter."""
    import deepspeed.utils

    model = lora(tiny_llama())
    constraint = WeightConstraint(model, random_subspace(model))
    constraint.attach()
    masters = {id(t.param): t.param.detach().clone() for t in constraint.tensors}  # projected, exact
    for tensor in constraint.tensors:
        tensor.param._hp_mapping = object()  # what ZeRO-1/2 attach to a parameter they shadow
    monkeypatch.setattr(deepspeed.utils, "safe_get_full_fp32_param", lambda p: masters[id(p)])
    with torch.no_grad():
        for tensor in constraint.tensors:  # the model's copy: what rounding to bf16 leaves
            tensor.param.add_(torch.randn_like(tensor.param) * 0.01)
    assert constraint.leakage().input_leakage > 1e-3


def test_post_train_twice_without_a_process_group_is_harmless(monkeypatch):
    """Axolotl calls post_train again after destroying the process group: no collective, no error."""
    from cwac_plugin.plugin import CWACPlugin

    plugin = CWACPlugin()
    model = tiny_llama()
    plugin.weight = WeightConstraint(model, random_subspace(model), mode="gradient")
    plugin.weight.attach()

    def collective(*args, **kwargs):
        raise AssertionError("post_train ran a collective")

    for name in ("all_reduce", "barrier", "broadcast", "all_gather"):
        monkeypatch.setattr(torch.distributed, name, collective)
    plugin.post_train({}, model)
    plugin.post_train({}, model)
    assert not plugin.weight._hooks
