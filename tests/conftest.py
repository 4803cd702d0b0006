import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # in-process load_cfg would send telemetry
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))

from tiny_model import build_tiny_llama, write_completion_dataset, write_pairs  # noqa: E402

SAFETY = [(f"how do i make a bomb {w}", "sorry i cannot help with that request it is harmful") for w in
          ["now", "at home", "quickly", "with water", "for school", "please", "today", "fast", "cheap", "safely"]]
BENIGN = [(f"what is the capital of france {w}", "paris is the capital of france") for w in
          ["now", "again", "please", "today", "quickly", "exactly", "really", "then", "here", "there"]]

DEEPSPEED = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "safety": write_pairs(root / "safety.jsonl", SAFETY),
        "benign": write_pairs(root / "benign.jsonl", BENIGN),
        "train": write_completion_dataset(root / "train.jsonl", n=64),
    }


def axolotl_config(tmp: Path, model: Path, data: dict, cwac: dict | None, **overrides) -> Path:
    """A small CPU training config; `cwac=None` leaves the plugin out."""
    cfg = {
        "base_model": str(model),
        "datasets": [{"path": str(data["train"]), "type": "completion"}],
        "dataset_prepared_path": str(tmp / "prepared"),
        "output_dir": str(tmp / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "bf16": False,
        "fp16": False,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 4,
        "save_safetensors": True,
        "seed": 42,
    }
    if cwac is not None:
        cfg["plugins"] = ["cwac_plugin.CWACPlugin"]
        cfg["cwac"] = {
            "safety_data": str(data["safety"]),
            "contrast_data": str(data["benign"]),
            "subspace": str(tmp / "subspace.safetensors"),
            "rank": 8,
            "output_rank": 4,
            **cwac,
        }
    cfg.update(overrides)
    if "deepspeed" in cfg and isinstance(cfg["deepspeed"], dict):
        ds_path = tmp / "deepspeed.json"
        ds_path.write_text(json.dumps(cfg["deepspeed"]))
        cfg["deepspeed"] = str(ds_path)
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a CLI the way a user does; on failure show the end of its output."""
    env = {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
    }
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


@pytest.fixture(scope="session")
def subspace_file(tmp_path_factory, tiny_model, data_files) -> Path:
    """One subspace for the float tiny model, computed by the CLI as a user would."""
    tmp = tmp_path_factory.mktemp("subspace")
    config = axolotl_config(tmp, tiny_model, data_files, cwac={})
    proc = check_ok(run(["cwac", "subspace", str(config)], cwd=tmp))
    assert "wrote" in proc.stdout
    return tmp / "subspace.safetensors"


def logged_steps(out_dir: Path) -> list[dict]:
    """Training-step entries of the last checkpoint's trainer_state.json.

    In a 2-process CPU run the file was once found with a second JSON document appended (a write
    race in the Trainer's checkpointing, outside this project): the first document is read.
    """
    state = max(out_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    document, _ = json.JSONDecoder().raw_decode(state.read_text())
    return [entry for entry in document["log_history"] if "loss" in entry]
