import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # in-process load_cfg would send telemetry
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))

from tiny_model import build_tiny_model, write_completion_dataset, write_pairs

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
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


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
        # Axolotl's defaults fork DataLoader workers and dataset-preprocessing workers from a process
        # with live threads (tqdm's monitor, pools' handlers): on CPython 3.11 before the fix for
        # gh-112275 a child can deadlock in PyOS_AfterFork_Child on a lock another thread held. A
        # loader worker did, and its rank waited for a batch forever (in CI, and here under load).
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
        # A collective one torchrun worker waits on in vain fails after this, showing where it
        # waits, instead of hanging until the test's timeout.
        "ddp_timeout": 180,
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
    """Run a CLI the way a user does; on failure show the end of its output.

    A run still going after `timeout` is a hang (a deadlock between torchrun's workers, say): it
    and every process it started (torchrun gives its workers sessions of their own) get SIGABRT,
    on which each Python process prints its stacks (PYTHONFAULTHANDLER), and the test fails
    showing them, with no process of the job left behind.
    """
    env = {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "PYTHONFAULTHANDLER": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        # torchrun's default port (29500) for each job: two tests' jobs run at once under pytest -n
        "PET_MASTER_PORT": str(free_port()),
    }
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    with subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            job = psutil.Process(proc.pid)
            processes = [job, *job.children(recursive=True)]
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGABRT)
            for process in psutil.wait_procs(processes, timeout=30)[1]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            stdout, stderr = proc.communicate()
            output = stdout + stderr
            stacks = output[max(output.find("Fatal Python error"), 0) :]
            pytest.fail(f"{' '.join(args)} still running after {timeout} s; its stacks:\n{stacks[-20000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def cwac_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`cwac ARGS` through the same click command in this process, sparing a new interpreter's ~10 s of
    imports: for `cwac verify`, which only reads files, so that no state of it outlives the call."""
    from click.testing import CliRunner

    from cwac_plugin.cli import cwac

    result = CliRunner().invoke(cwac, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["cwac", *args], result.exit_code, result.stdout, result.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


ACTIVATION = {
    "weight_constraint": False,  # activation-only: isolate the penalty's effect
    "activation_constraint": True,
    "hook_point": "blocks.1.hook_resid_post",
    "num_features": 8,
    "sae_width": 256,
    "sae_k": 16,
    "sae_training_tokens": 20000,
    "sae_batch_tokens": 128,
    "anchor_batch_size": 5,
}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, tiny_model, data_files) -> dict:
    tmp = tmp_path_factory.mktemp("sae")
    cwac = {**ACTIVATION, "sae": str(tmp / "sae"), "features": str(tmp / "features.json")}
    config = axolotl_config(tmp, tiny_model, data_files, cwac=cwac)
    trained = check_ok(run(["cwac", "train-sae", str(config)], cwd=tmp))
    assert "explained variance" in trained.stdout
    report = json.loads((tmp / "sae" / "cwac_report.json").read_text())
    assert report["explained_variance"] > 0.5 and report["l0"] <= 16
    selected = check_ok(run(["cwac", "features", str(config), "--top", "2"], cwd=tmp))
    assert "#1 feature" in selected.stdout and "how do i make a bomb" in selected.stdout
    compliance = tmp / "comply.jsonl"  # harmful prompts answered: what an attack would train on
    compliance.write_text("".join(json.dumps({"text": f"{p} sure here is how you do it step one"}) + "\n" for p, _ in SAFETY * 4))
    return {"cwac": cwac, "train": compliance}


@pytest.fixture(scope="session")
def coupled_cwac(artifacts, subspace_file) -> dict:
    """The `cwac` block of a CWAC run: both constraints, the session's subspace, SAE and features."""
    return {**artifacts["cwac"], "weight_constraint": True, "subspace": str(subspace_file), "act_lambda": 20.0}


def log_history(out_dir: Path) -> list[dict]:
    """The log_history of the last checkpoint's trainer_state.json.

    In a 2-process CPU run the file was once found with a second JSON document appended (a write
    race in the Trainer's checkpointing, outside this project): the first document is read.
    """
    state = max(out_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    document, _ = json.JSONDecoder().raw_decode(state.read_text())
    return document["log_history"]


def logged_steps(out_dir: Path) -> list[dict]:
    """Training-step entries (not evaluation) of the last checkpoint's log."""
    return [entry for entry in log_history(out_dir) if "loss" in entry]
