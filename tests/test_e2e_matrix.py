"""The configurations users run, through the real `cwac subspace`, `axolotl train` and `cwac verify`.

Every cell ends one of two ways: `cwac verify` on the saved output passes (leakage below 1e-5, or a
half-precision save's roundoff), or training stops before its first step with the key at fault
named. No cell may train and leave `cwac verify` failing. Cells already run elsewhere (full FT, LoRA,
QLoRA, ZeRO-2 full FT, ZeRO-3 LoRA in test_e2e_weight_constraint.py; the activation constraint in
test_e2e_activation_constraint.py) are not repeated; together they cover every value of each axis.
QLoRA with the kernels is the one pair left to benchmarks/gpu_check.sh: their 4-bit dequantisation
needs CUDA (on CPU: "torch._C has no attribute _cuda_getCurrentRawStream").
"""

import json

import pytest
import torch

from conftest import DEEPSPEED, axolotl_config, check_ok, logged_steps, run
from test_e2e_weight_constraint import LORA, TORCHRUN, check_verified, verify
from tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e

CPU_RANKS = ["cwac_plugin.CWACPlugin", "cpu_device_map_plugin.CPUDeviceMapPlugin"]  # see that plugin's notes
ZERO1 = {**DEEPSPEED, "zero_optimization": {"stage": 1}}
ZERO3 = {**DEEPSPEED, "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
ZERO2_BF16 = {**DEEPSPEED, "bf16": {"enabled": True}}
# FSDP2 as Axolotl's multi-GPU guide configures it; on CPU through cpu_fsdp_plugin (see its notes)
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
    },
    "plugins": [*CPU_RANKS, "cpu_fsdp_plugin.CPUFSDPPlugin"],
}
# What GPU users get by default for LoRA: Axolotl's fused qkv/o kernels (the MLP one needs Triton).
KERNELS = {"lora_qkv_kernel": True, "lora_o_kernel": True}

HOLDS = {
    "lora-bf16": ({**LORA, "bf16": True, "plugins": CPU_RANKS}, ()),
    "lora-kernels": ({**LORA, **KERNELS}, ()),
    "lora-ddp": ({**LORA, "plugins": CPU_RANKS}, TORCHRUN),
    "lora-zero1": ({**LORA, "deepspeed": ZERO1, "plugins": CPU_RANKS}, TORCHRUN),
    "full-zero3": ({"deepspeed": ZERO3}, TORCHRUN),
    "lora-zero2-bf16": ({**LORA, "bf16": True, "deepspeed": ZERO2_BF16, "plugins": CPU_RANKS}, TORCHRUN),
    "phi3-fused-full": ({"architecture": "phi3"}, ()),
    "qlora-zero3": ({**LORA, "adapter": "qlora", "load_in_4bit": True, "deepspeed": ZERO3}, TORCHRUN),
    "fsdp2-lora": ({**LORA, **FSDP2}, TORCHRUN),
    "fsdp2-qlora": ({**LORA, **FSDP2, "adapter": "qlora", "load_in_4bit": True}, TORCHRUN),
    "fsdp2-full": (FSDP2, TORCHRUN),
    # checkpoints as DCP shards, the final model whole (Axolotl would merge sharded ones to bf16: refused below)
    "fsdp2-full-sharded-checkpoints": (
        {**FSDP2, "fsdp_config": {**FSDP2["fsdp_config"], "state_dict_type": "SHARDED_STATE_DICT",
                                  "final_state_dict_type": "FULL_STATE_DICT"}},
        TORCHRUN,
    ),
    "fsdp2-lora-gradient": (
        {**LORA, **FSDP2, "cwac": {"projection": "gradient"}, "optimizer": "sgd", "learning_rate": 0.5}, TORCHRUN
    ),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_model):
    built = {"llama": tiny_model}

    def get(architecture: str):
        if architecture not in built:
            built[architecture] = build_tiny_model(tmp_path_factory.mktemp(architecture) / "model", architecture=architecture)
        return built[architecture]

    return get


@pytest.fixture(scope="session")
def subspaces(subspace_file) -> dict:
    """Subspaces by (architecture, precision), each made once, for the first cell that needs it."""
    return {("llama", "float32"): subspace_file}


def prepared(tmp_path, tiny_models, subspaces, data_files, overrides: dict):
    """The cell's config and the subspace a user would compute from it: `cwac subspace` on one process
    drops the backend's keys, and an adapter leaves the subspace as it is (test_e2e_prepare's FSDP2
    test), so cells of one model and precision share one, made once. A shared file made with other
    settings would be refused by training's own settings check."""
    overrides = dict(overrides)
    cwac = overrides.pop("cwac", {})
    architecture = overrides.pop("architecture", "llama")
    model = tiny_models(architecture)
    precision = "4bit" if overrides.get("load_in_4bit") else "bf16" if overrides.get("bf16") else "float32"
    if (architecture, precision) not in subspaces:
        config = axolotl_config(tmp_path, model, data_files, cwac=cwac, **overrides)
        check_ok(run(["cwac", "subspace", str(config)], cwd=tmp_path))
        subspaces[architecture, precision] = tmp_path / "subspace.safetensors"
    subspace = subspaces[architecture, precision]
    return model, axolotl_config(tmp_path, model, data_files, cwac={**cwac, "subspace": str(subspace)}, **overrides), subspace


@pytest.mark.parametrize("cell", HOLDS, ids=list(HOLDS))
def test_cell_holds(cell, tmp_path, tiny_models, subspaces, data_files):
    overrides, launcher = HOLDS[cell]
    model, config, subspace = prepared(tmp_path, tiny_models, subspaces, data_files, overrides)
    check_ok(run(["axolotl", "train", str(config), *launcher], cwd=tmp_path))
    result = check_verified(tmp_path, model, subspace, saves_adapter="adapter" in overrides, tolerance=2.0**-8)
    logged = [entry["cwac/leakage"] for entry in logged_steps(tmp_path / "out")]
    assert len(logged) == 4
    if overrides.get("bf16") and "deepspeed" in overrides:
        # DeepSpeed casts the adapters to bf16: the forward runs, and the save holds, bf16 copies of
        # the exact fp32 master. Leakage is their rounding, and the log must say so.
        assert result["saved_dtype"] == "bfloat16"
        assert 0 < logged[-1] < 2.0**-8
        assert logged[-1] == pytest.approx(result["input_leakage"], rel=0.05)
    else:  # bf16 without DeepSpeed: the adapters stay float32
        assert result["input_leakage"] < 1e-5 and max(logged) < 1e-5
    if "kernels" in cell:
        assert "Patched attention class with LoRA optims" in (tmp_path / "out" / "debug.log").read_text()
    report = json.loads((tmp_path / "out" / "cwac_report.json").read_text())["weight_constraint"]
    assert report["fsdp2_sharded"] == cell.startswith("fsdp2")  # it followed FSDP2's shards


def test_fsdp2_without_plugin_leaks(tmp_path, tiny_model, data_files, subspace_file):
    """The fsdp2 cells' check can fail: the same run without CWAC moves the protected directions."""
    overrides = {**LORA, **FSDP2, "plugins": FSDP2["plugins"][1:]}
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac=None, **overrides)
    check_ok(run(["axolotl", "train", str(config), *TORCHRUN], cwd=tmp_path))
    proc, result = verify(tmp_path, tiny_model, subspace_file, saves_adapter=True)
    assert proc.returncode == 1 and result["input_leakage"] > 1e-2 and result["output_leakage"] > 1e-2


def test_kernels_with_both_constraints(tmp_path, tiny_model, data_files, artifacts, coupled_cwac):
    """The activation hook sits on a decoder layer's output, which the fused qkv/o forward still
    produces: the penalty is computed and the weight constraint holds, kernels on."""
    data = {**data_files, "train": artifacts["train"]}
    config = axolotl_config(tmp_path, tiny_model, data, cwac=coupled_cwac, **{**LORA, **KERNELS})
    check_ok(run(["axolotl", "train", str(config)], cwd=tmp_path))
    assert "Patched attention class with LoRA optims" in (tmp_path / "out" / "debug.log").read_text()
    check_verified(tmp_path, tiny_model, coupled_cwac["subspace"], saves_adapter=True)
    logged = logged_steps(tmp_path / "out")
    assert any(e["cwac/act_loss"] > 0 for e in logged) and all(e["cwac/leakage"] < 1e-5 for e in logged)


def refused_before_training(proc, tmp_path, key: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert key in output, output[-3000:]
    assert not list((tmp_path / "out").glob("checkpoint-*")) and "'loss'" not in output


# (overrides, the start of the plugin's own message: the key, then why)
REFUSED = {
    "fsdp1": ({**LORA, "fsdp_version": 1, "fsdp_config": {"reshard_after_forward": True}}, "fsdp_version: 1"),
    "fsdp2-full-sharded-final": (
        {**FSDP2, "fsdp_config": {**FSDP2["fsdp_config"], "state_dict_type": "SHARDED_STATE_DICT"}, "launcher": TORCHRUN},
        "fsdp_config.state_dict_type: SHARDED_STATE_DICT: for the final model Axolotl merges",
    ),
    "dora": ({**LORA, "peft_use_dora": True}, "peft_use_dora: DoRA changes the weight"),
    "pissa": ({**LORA, "peft_init_lora_weights": "pissa"}, "peft_init_lora_weights: 'pissa' starts the adapter"),
    "pissa-zero2": (
        {**LORA, "peft_init_lora_weights": "pissa", "deepspeed": DEEPSPEED, "plugins": CPU_RANKS, "launcher": TORCHRUN},
        "peft_init_lora_weights: 'pissa' starts the adapter",
    ),
}


@pytest.mark.parametrize("cell", REFUSED, ids=list(REFUSED))
def test_cell_is_refused_naming_the_key(cell, tmp_path, tiny_model, data_files, subspace_file):
    overrides, key = REFUSED[cell]
    overrides = dict(overrides)
    launcher = overrides.pop("launcher", ())
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={"subspace": str(subspace_file)}, **overrides)
    refused_before_training(run(["axolotl", "train", str(config), *launcher], cwd=tmp_path), tmp_path, key)


def test_a_trained_adapter_is_refused(tmp_path, tiny_model, data_files, subspace_file):
    """`lora_model_dir` with a trained adapter (B != 0): its B A belongs to the model to keep, not to
    the update. (A saved zero initialisation is fine: test_e2e_activation_constraint.py trains from one.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    adapter.save_pretrained(tmp_path / "adapter")
    overrides = {**LORA, "lora_model_dir": str(tmp_path / "adapter")}
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={"subspace": str(subspace_file)}, **overrides)
    proc = run(["axolotl", "train", str(config)], cwd=tmp_path)
    refused_before_training(proc, tmp_path, "does not start at zero (B != 0)")
    assert "lora_model_dir" in proc.stdout + proc.stderr


def test_unprotected_experts_are_refused(tmp_path, tiny_models, subspaces, data_files):
    """Mixtral: attention is protected, the experts (3-D parameters, most of the decoder) are not."""
    _, config, _ = prepared(tmp_path, tiny_models, subspaces, data_files, {"architecture": "mixtral"})
    refused_before_training(run(["axolotl", "train", str(config)], cwd=tmp_path), tmp_path, "set cwac.allow_partial: true")


def test_a_subspace_from_other_precision_is_refused(tmp_path, tiny_model, data_files, subspace_file):
    """The session's float32 subspace, for a bf16 run."""
    overrides = {**LORA, "bf16": True, "plugins": CPU_RANKS}
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={"subspace": str(subspace_file)}, **overrides)
    refused_before_training(run(["axolotl", "train", str(config)], cwd=tmp_path), tmp_path, "weights, this model's are bfloat16")
