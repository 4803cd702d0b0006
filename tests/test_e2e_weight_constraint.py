"""`cwac subspace` then the real `axolotl train` with the plugin, checked from the saved weights.

Every run is a subprocess, as a user runs it. The check reloads the base model and the saved
model/adapter (merged by PEFT, not by our code) and measures ||dW U|| / ||dW|| against the file.
"""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cwac_plugin.subspace import Subspace

from conftest import DEEPSPEED, axolotl_config, check_ok, logged_steps, run

pytestmark = pytest.mark.e2e

# Axolotl patches LoRA layers with CUDA kernels by default; they cannot run on CPU.
LORA = {
    "adapter": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
}


def trained_deltas(base_dir: Path, out_dir: Path, names: list[str], adapter: bool) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    base = load_file(str(base_dir / "model.safetensors"))
    if adapter:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        trained = PeftModel.from_pretrained(model, out_dir).merge_and_unload().state_dict()
    else:
        trained = load_file(str(out_dir / "model.safetensors"))
    return {n: trained[f"{n}.weight"].double() - base[f"{n}.weight"].double() for n in names}


def leakage_of(subspace: Subspace, deltas: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    update = input_leak = output_leak = 0.0
    for name, delta in deltas.items():
        update += delta.square().sum().item()
        input_leak += (delta @ subspace.input_bases[name].double()).square().sum().item()
        if name in subspace.output_bases:
            output_leak += (subspace.output_bases[name].double().T @ delta).square().sum().item()
    return math.sqrt(update), math.sqrt(input_leak / update), math.sqrt(output_leak / update)


def train_and_check(tmp, tiny_model, data_files, subspace_file, saves_adapter: bool, launcher=(), cwac=None, **overrides):
    cwac = {"subspace": str(subspace_file), **(cwac or {})}
    config = axolotl_config(tmp, tiny_model, data_files, cwac=cwac, **overrides)
    check_ok(run(["axolotl", "train", str(config), *launcher], cwd=tmp))
    subspace = Subspace.load(subspace_file)
    norm, input_leakage, output_leakage = leakage_of(
        subspace, trained_deltas(tiny_model, tmp / "out", subspace.module_names, saves_adapter)
    )
    assert norm > 1e-3, "the protected weights did not change: no training happened"
    assert input_leakage < 1e-5
    assert output_leakage < 1e-5
    logged = [entry["cwac/leakage"] for entry in logged_steps(tmp / "out")]
    assert len(logged) == 4 and max(logged) < 1e-5
    return config


def test_lora_without_plugin_leaks(tmp_path, tiny_model, data_files, subspace_file):
    """The same run without CWAC moves the protected directions: the check above can fail."""
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac=None, **LORA)
    check_ok(run(["axolotl", "train", str(config)], cwd=tmp_path))
    subspace = Subspace.load(subspace_file)
    _, input_leakage, output_leakage = leakage_of(
        subspace, trained_deltas(tiny_model, tmp_path / "out", subspace.module_names, adapter=True)
    )
    assert input_leakage > 1e-2 and output_leakage > 1e-2


def test_lora(tmp_path, tiny_model, data_files, subspace_file):
    train_and_check(tmp_path, tiny_model, data_files, subspace_file, saves_adapter=True, **LORA)


def test_full_finetune(tmp_path, tiny_model, data_files, subspace_file):
    train_and_check(tmp_path, tiny_model, data_files, subspace_file, saves_adapter=False)


def test_qlora_with_subspace_from_4bit_model(tmp_path, tiny_model, data_files):
    """`cwac subspace` on the bitsandbytes 4-bit model, then QLoRA training against it."""
    overrides = {**LORA, "adapter": "qlora", "load_in_4bit": True}
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={}, **overrides)
    check_ok(run(["cwac", "subspace", str(config)], cwd=tmp_path))
    subspace_file = tmp_path / "subspace.safetensors"
    train_and_check(tmp_path, tiny_model, data_files, subspace_file, saves_adapter=True, **overrides)


TORCHRUN = ["--launcher", "torchrun", "--", "--nproc_per_node", "2"]


def test_deepspeed_zero2_full_finetune(tmp_path, tiny_model, data_files, subspace_file):
    train_and_check(
        tmp_path,
        tiny_model,
        data_files,
        subspace_file,
        saves_adapter=False,
        launcher=TORCHRUN,
        deepspeed=DEEPSPEED,
        plugins=["cwac_plugin.CWACPlugin", "cpu_device_map_plugin.CPUDeviceMapPlugin"],
    )


@pytest.mark.parametrize(
    "projection",
    [
        {"cwac": {"projection": "update"}},
        # gradient mode is exact for SGD: this checks the tensor hooks under ZeRO-3's partitioning
        {"cwac": {"projection": "gradient"}, "optimizer": "sgd", "learning_rate": 0.5},
    ],
    ids=["update", "gradient-sgd"],
)
def test_deepspeed_zero3_lora(tmp_path, tiny_model, data_files, subspace_file, projection):
    zero3 = {**DEEPSPEED, "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    overrides = {**LORA, "deepspeed": zero3, **projection}
    train_and_check(tmp_path, tiny_model, data_files, subspace_file, saves_adapter=True, launcher=TORCHRUN, **overrides)
