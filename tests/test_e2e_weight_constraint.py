"""`cwac subspace` then the real `axolotl train` with the plugin, checked from the saved weights.

Every run is a subprocess, as a user runs it. The check reloads the base model and the saved
model/adapter (merged by PEFT, not by our code) and measures ||dW U|| / ||dW|| against the file.
"""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import DEEPSPEED, axolotl_config, check_ok, cwac_in_process, logged_steps, run

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


def verify(
    tmp: Path, base: Path, subspace_file: Path, saves_adapter: bool, in_process: bool = True
) -> tuple[subprocess.CompletedProcess, dict]:
    """`cwac verify` on what training saved, as a reviewer runs it: PEFT merges the adapter. In this
    process unless asked (test_lora_without_plugin_leaks runs the installed command once)."""
    saved = ["--adapter" if saves_adapter else "--model", str(tmp / "out")]
    args = ["verify", "--base", str(base), *saved, "--subspace", str(subspace_file), "--out", str(tmp / "verify.json")]
    proc = cwac_in_process(args) if in_process else run(["cwac", *args], cwd=tmp)
    return proc, json.loads((tmp / "verify.json").read_text())


def check_verified(tmp: Path, base: Path, subspace_file: Path, saves_adapter: bool, tolerance: float = 1e-5) -> dict:
    proc, result = verify(tmp, base, subspace_file, saves_adapter)
    check_ok(proc)
    assert result["update_norm"] > 1e-3, "the protected weights did not change: no training happened"
    assert result["input_leakage"] < tolerance and result["output_leakage"] < tolerance
    assert result["coverage"] > 0.99
    report = json.loads((tmp / "out" / "cwac_report.json").read_text())
    assert report["weight_constraint"]["final_leakage"] < tolerance
    return result


def train_and_check(tmp, tiny_model, data_files, subspace_file, saves_adapter: bool, launcher=(), cwac=None, **overrides):
    cwac = {"subspace": str(subspace_file), **(cwac or {})}
    config = axolotl_config(tmp, tiny_model, data_files, cwac=cwac, **overrides)
    check_ok(run(["axolotl", "train", str(config), *launcher], cwd=tmp))
    check_verified(tmp, tiny_model, subspace_file, saves_adapter)
    logged = [entry["cwac/leakage"] for entry in logged_steps(tmp / "out")]
    assert len(logged) == 4 and max(logged) < 1e-5
    return config


def test_lora_without_plugin_leaks(tmp_path, tiny_model, data_files, subspace_file):
    """The same run without CWAC moves the protected directions: the check above can fail."""
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac=None, **LORA)
    check_ok(run(["axolotl", "train", str(config)], cwd=tmp_path))
    proc, result = verify(tmp_path, tiny_model, subspace_file, saves_adapter=True, in_process=False)
    assert proc.returncode == 1 and "FAILED: input leakage" in proc.stderr
    assert result["input_leakage"] > 1e-2 and result["output_leakage"] > 1e-2 and not result["passed"]


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
