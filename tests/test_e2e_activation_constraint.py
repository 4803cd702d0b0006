"""`cwac train-sae`, `cwac features`, then `axolotl train` with and without the drift penalty.

The training data teaches the model to comply with the safety prompts, which moves their
features; the penalty must keep them closer to the aligned model. Drift is measured after
training from the saved adapter (merged by PEFT), not from the logs.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cwac_plugin.data import Batches, Example
from cwac_plugin.sae import FeatureSet, ResidualTap

from conftest import DEEPSPEED, SAFETY, axolotl_config, check_ok, logged_steps, run
from test_e2e_weight_constraint import LORA, TORCHRUN, check_verified

pytestmark = pytest.mark.e2e

def feature_drift(base_dir: Path, adapter_dir: Path, cwac: dict) -> float:
    """Mean |z_trained - z_aligned| / reference scale of the selected features on the safety prompts."""
    from peft import PeftModel
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    features = FeatureSet.load(cwac["features"])
    sae = SAE.load_from_disk(cwac["sae"])
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    aligned = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    trained = trained.merge_and_unload().eval()
    (batch,) = Batches(tokenizer, [Example(p, r) for p, r in SAFETY], 64, len(SAFETY))

    def selected(model):
        tap = ResidualTap(model, features.hook_point)
        with torch.no_grad(), tap.capture() as captured:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tap.remove()
        return sae.encode(captured[0])[..., features.indices]

    drift = (selected(trained) - selected(aligned)).abs() / torch.tensor(features.reference_scale)
    mask = batch["attention_mask"].bool()
    return drift[mask].mean().item()


MODES = {
    "lora": ({**LORA}, ()),
    "qlora": ({**LORA, "adapter": "qlora", "load_in_4bit": True}, ()),
    "zero3": (
        {**LORA, "deepspeed": {**DEEPSPEED, "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}},
        TORCHRUN,
    ),
}


@pytest.fixture(scope="session")
def initial_adapter(tmp_path_factory, tiny_model) -> Path:
    """One LoRA initialisation for the runs that are compared. Axolotl's own adapter initialisation
    differs between processes in spite of `seed` (after one step of identical loss the adapters
    differed; plain Axolotl, no plugin), which made an unpenalised run's drift range 0.16-0.52 and
    once put it below the penalised run's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    lora = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, target_modules="all-linear")
    path = tmp_path_factory.mktemp("initial_adapter")
    get_peft_model(model, lora).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", list(MODES))
def test_penalty_keeps_features_closer_to_the_aligned_model(
    tmp_path, tiny_model, data_files, artifacts, initial_adapter, mode
):
    overrides, launcher = MODES[mode]
    overrides = {**overrides, "lora_model_dir": str(initial_adapter)}
    data = {**data_files, "train": artifacts["train"]}
    drift = {}
    # Both runs start from `initial_adapter`, so they differ only in lambda; the drifts then repeat
    # exactly from session to session here (with the earlier default form, activations and mean scale:
    # lora 0.403 vs 0.102, qlora 0.221 vs 0.100, zero3 = lora; the run prints today's).
    # At learning rate 1e-2 the penalised ZeRO-3 run oscillated (act_loss 700 -> 5 200 -> 1 000 -> ...)
    # and once ended above the unpenalised drift (0.65 vs 0.51); 3e-3 keeps the optimisation stable.
    for lam in (0.0, 100.0):
        run_dir = tmp_path / f"lambda{lam:g}"
        run_dir.mkdir()
        config = axolotl_config(
            run_dir, tiny_model, data, cwac={**artifacts["cwac"], "act_lambda": lam},
            max_steps=8, learning_rate=3e-3, **overrides,
        )
        check_ok(run(["axolotl", "train", str(config), *launcher], cwd=run_dir))
        out = run_dir / "out"
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:  # a plain adapter, no plugin state
            assert all(".lora_A." in key or ".lora_B." in key for key in f.keys())  # noqa: SIM118 (not iterable)
        logged = logged_steps(out)
        assert len(logged) == 8 and all("cwac/act_loss" in e and "cwac/feature_drift" in e for e in logged)
        drift[lam] = feature_drift(tiny_model, out, artifacts["cwac"])
    print(f"{mode}: feature drift without penalty {drift[0.0]:.4f}, with {drift[100.0]:.4f}")
    assert drift[0.0] > 0.05, "the attack data did not move the features: the test shows nothing"
    assert drift[100.0] < drift[0.0], drift


def test_coupled_cwac_run(tmp_path, tiny_model, data_files, artifacts, subspace_file, coupled_cwac):
    """Both constraints from YAML: updates stay out of the subspace and the penalty is applied."""
    config = axolotl_config(tmp_path, tiny_model, {**data_files, "train": artifacts["train"]}, cwac=coupled_cwac, **LORA)
    proc = check_ok(run(["axolotl", "train", str(config)], cwd=tmp_path))
    assert "CWAC weight constraint (update mode)" in proc.stdout + proc.stderr
    assert "CWAC activation constraint: 8 SAE features at blocks.1.hook_resid_post" in proc.stdout + proc.stderr
    check_verified(tmp_path, tiny_model, subspace_file, saves_adapter=True)
    logged = logged_steps(tmp_path / "out")
    assert all(e["cwac/leakage"] < 1e-5 and e["cwac/act_loss"] >= 0 for e in logged)
    assert any(e["cwac/act_loss"] > 0 for e in logged)


def test_train_sae_and_features_are_reproducible(tmp_path, tiny_model, data_files, artifacts):
    """The same config and seed in another process: the same SAE weights and the same features."""
    cwac = {**artifacts["cwac"], "sae": str(tmp_path / "sae"), "features": str(tmp_path / "features.json")}
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac=cwac)
    check_ok(run(["cwac", "train-sae", str(config)], cwd=tmp_path))
    check_ok(run(["cwac", "features", str(config)], cwd=tmp_path))
    first = load_file(str(Path(artifacts["cwac"]["sae"]) / "sae_weights.safetensors"))
    second = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    first_features, second_features = FeatureSet.load(artifacts["cwac"]["features"]), FeatureSet.load(cwac["features"])
    assert first_features.indices == second_features.indices and first_features.scores == second_features.scores
