"""Resume and coexistence with other Axolotl features, through the real `axolotl train`."""

import pytest

from conftest import axolotl_config, check_ok, log_history, logged_steps, run
from test_e2e_matrix import FSDP2
from test_e2e_weight_constraint import LORA, TORCHRUN, check_verified

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("sharding", ["none", "fsdp2"])
def test_resumed_full_finetune_keeps_both_constraints(
    sharding, tmp_path, tiny_model, data_files, subspace_file, artifacts, coupled_cwac
):
    """Stop at checkpoint-2, resume: steps 3-4 match the uninterrupted run, measured from W0.

    Full fine-tuning is the hard case: the resumed weights are not W0, so W0 U and the aligned
    reference activations must come from before the checkpoint is loaded. Under FSDP2 the
    checkpoint is loaded into the shards, after the constraint re-bound to them.
    """
    data = {**data_files, "train": artifacts["train"]}
    overrides, launcher = (FSDP2, TORCHRUN) if sharding == "fsdp2" else ({}, [])
    runs = {}
    for name, resume in (("uninterrupted", {}), ("resumed", {"resume_from_checkpoint": str(tmp_path / "uninterrupted" / "out" / "checkpoint-2")})):
        run_dir = tmp_path / name
        run_dir.mkdir()
        config = axolotl_config(
            run_dir, tiny_model, data, cwac=coupled_cwac, save_steps=2, learning_rate=1e-2, **resume, **overrides
        )
        check_ok(run(["axolotl", "train", str(config), *launcher], cwd=run_dir))
        runs[name] = {entry["step"]: entry for entry in logged_steps(run_dir / "out")}

    check_verified(tmp_path / "resumed", tiny_model, subspace_file, saves_adapter=False)
    for step in (3, 4):
        resumed, uninterrupted = runs["resumed"][step], runs["uninterrupted"][step]
        assert resumed["cwac/leakage"] < 1e-5
        # References from the aligned weights, not from checkpoint-2's: the same drift as without a stop.
        assert resumed["cwac/feature_drift"] > 0.01
        assert resumed["cwac/feature_drift"] == pytest.approx(uninterrupted["cwac/feature_drift"], rel=1e-3)
        assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-3)


def test_coexists_with_other_plugins_packing_checkpointing_and_eval(
    tmp_path, tiny_model, data_files, subspace_file, artifacts, coupled_cwac
):
    """Grokfast (rewrites gradients before each step), a plugin wrapping the same trainer methods,
    sample packing, gradient checkpointing and evaluation during training, all in one run."""
    overrides = {
        **LORA,
        "plugins": [
            "cwac_plugin.CWACPlugin",
            "axolotl.integrations.grokfast.GrokfastPlugin",
            "loss_wrapping_plugin.LossWrappingPlugin",
        ],
        "grokfast_alpha": 0.9,
        "grokfast_lamb": 2.0,
        "sample_packing": True,
        "gradient_checkpointing": True,
        "val_set_size": 0.2,
        "eval_strategy": "steps",
        "eval_steps": 2,
    }
    config = axolotl_config(tmp_path, tiny_model, {**data_files, "train": artifacts["train"]}, cwac=coupled_cwac, **overrides)
    proc = check_ok(run(["axolotl", "train", str(config)], cwd=tmp_path))
    assert "Adding Grokfast callback" in proc.stdout + proc.stderr

    check_verified(tmp_path, tiny_model, subspace_file, saves_adapter=True)
    assert {2, 4} <= {e["step"] for e in log_history(tmp_path / "out") if "eval_loss" in e}
    logged = logged_steps(tmp_path / "out")
    assert len(logged) == 4
    assert all(e["cwac/leakage"] < 1e-5 and "cwac/act_loss" in e for e in logged)
    assert all(e["other_plugin/compute_loss_calls"] > 0 for e in logged)
    assert any(e["cwac/act_loss"] > 0 for e in logged)
