"""The `cwac` block: pydantic validation alone, inside Axolotl's config, and its errors in use."""

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cwac_plugin.config import DEFAULT_TARGET_MODULES, CWACConfig

from conftest import TESTS_DIR, axolotl_config, run


def test_defaults():
    cfg = CWACConfig(subspace="s.safetensors")
    assert cfg.subspace_method == "gradient" and cfg.projection == "update"
    assert cfg.rank == 16 and cfg.energy is None and cfg.output_rank == 16
    assert cfg.target_modules == DEFAULT_TARGET_MODULES and cfg.weight_constraint


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({}, "cwac.subspace is required while cwac.weight_constraint is true"),
        ({"subspace": "s", "subspace_method": "delta"}, "needs cwac.delta_base_model"),
        ({"subspace": "s", "rank": None}, r"set cwac.rank \(a fixed k\) or cwac.energy"),
        ({"subspace": "s", "projection": "both"}, "projection"),
        ({"subspace": "s", "rank": 0}, "rank"),
        ({"subspace": "s", "energy": 1.5}, "energy"),
        ({"subspace": "s", "ranks": 4}, "ranks"),
        ({"subspace": "s", "layers": [-1]}, "cwac.layers"),
        ({"subspace": "s", "activation_constraint": True}, "cwac.features is required"),
        ({"subspace": "s", "sae_release": "gemma-scope"}, "go together"),
        ({"subspace": "s", "act_anchor": "both"}, "act_anchor"),
        ({"subspace": "s", "eval_batch_size": 8}, "renamed cwac.generate_batch_size"),
    ],
)
def test_invalid_blocks_name_the_key(block, message):
    with pytest.raises(ValidationError, match=message):
        CWACConfig(**block)


def test_ablations_from_yaml_alone():
    activation_only = CWACConfig(weight_constraint=False, activation_constraint=True, features="f.json")
    assert activation_only.subspace is None
    both = CWACConfig(subspace="s", activation_constraint=True, features="f.json")
    assert both.weight_constraint and both.activation_constraint
    with pytest.raises(ValidationError, match="both false: the plugin would do nothing"):
        CWACConfig(weight_constraint=False)


def test_block_survives_axolotl_validation_and_typos_fail(tmp_path, tiny_model, data_files):
    """Axolotl drops unknown keys silently unless the plugin registered its schema first."""
    from axolotl.cli.config import load_cfg

    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={"rank": 5, "projection": "gradient"})
    cfg = load_cfg(str(config))
    assert cfg.cwac["rank"] == 5 and cfg.cwac["projection"] == "gradient"
    assert cfg.cwac["target_modules"] == DEFAULT_TARGET_MODULES  # defaults filled in by our model

    raw = yaml.safe_load(config.read_text())
    raw["cwac"]["rnak"] = 5
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="rnak"):
        load_cfg(str(config))


@pytest.mark.parametrize("block", [{}, None])
def test_an_empty_block_puts_the_artifacts_beside_the_output(tmp_path, tiny_model, data_files, block):
    from axolotl.cli.config import load_cfg

    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={})
    raw = yaml.safe_load(config.read_text())
    raw["cwac"] = block
    config.write_text(yaml.safe_dump(raw))
    cfg = load_cfg(str(config))
    out = tmp_path / "out" / "cwac"
    assert cfg.cwac["subspace"] == str(out / "subspace.safetensors") and cfg.cwac["features"] == str(out / "features.json")
    assert cfg.cwac["sae"] == str(out / "sae") and cfg.cwac["safety_data"] is None


def test_plugin_without_block_is_an_error():
    from cwac_plugin.plugin import CWACPlugin

    with pytest.raises(ValueError, match="no `cwac:` block"):
        CWACPlugin().pre_model_load({"cwac": None})


def test_plugin_rejects_a_subspace_computed_under_other_settings(subspace_file):
    """The config `cwac subspace` ran on passes; with cwac.rank edited afterwards the file is stale."""
    from cwac_plugin.errors import ArtifactError
    from cwac_plugin.plugin import CWACPlugin

    cfg = yaml.safe_load((subspace_file.parent / "config.yml").read_text())
    CWACPlugin().pre_model_load(cfg)
    cfg["cwac"]["rank"] = 16
    with pytest.raises(ArtifactError, match=r"stale \(settings.rank: 8 -> 16\): run `cwac prepare"):
        CWACPlugin().pre_model_load(cfg)


def test_a_subspace_without_a_recipe_is_still_checked_against_the_block(subspace_file, tmp_path):
    """Files from the Python API (or an older version) record no recipe: their own settings check holds."""
    from cwac_plugin.plugin import CWACPlugin
    from cwac_plugin.prepare import RECIPE_KEY
    from cwac_plugin.subspace import Subspace, SubspaceError

    subspace = Subspace.load(subspace_file)
    del subspace.metadata[RECIPE_KEY]
    path = subspace.save(tmp_path / "no_recipe.safetensors")
    block = {"subspace": str(path), "rank": 8, "output_rank": 4}
    CWACPlugin().pre_model_load({"cwac": block})
    with pytest.raises(SubspaceError, match="computed with rank=8 but cwac.rank is 16"):
        CWACPlugin().pre_model_load({"cwac": {**block, "rank": 16}})


def test_training_with_missing_subspace_fails_before_model_load(tmp_path, tiny_model, data_files):
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={"subspace": str(tmp_path / "nope.safetensors")})
    proc = run(["axolotl", "train", str(config)], cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"cwac.subspace: {tmp_path / 'nope.safetensors'} is missing: run `cwac prepare {config}`" in output
    assert "Loading weights" not in output  # failed before the model was loaded


def test_subspace_cli_reports_data_errors(tmp_path, tiny_model, data_files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={"safety_data": str(bad)})
    proc = run(["cwac", "subspace", str(config)], cwd=tmp_path)
    assert proc.returncode == 2
    assert f"cwac.safety_data: {bad}:2 needs string fields 'prompt' and 'response'" in proc.stderr
    assert "Loading weights" not in proc.stdout + proc.stderr
    assert not (tmp_path / "subspace.safetensors").exists()


def test_prompt_longer_than_max_length_fails_before_model_load(tmp_path, tiny_model, data_files):
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text('{"prompt": "a", "response": "b"}\n' + json.dumps({"prompt": "bomb " * 40, "response": "no"}) + "\n")
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={"safety_data": str(long_prompt), "max_length": 16})
    proc = run(["cwac", "subspace", str(config)], cwd=tmp_path)
    assert proc.returncode == 2
    assert f"cwac.safety_data: {long_prompt}:2: the prompt alone is" in proc.stderr
    assert "raise cwac.max_length" in proc.stderr
    assert "Loading weights" not in proc.stdout + proc.stderr
    assert not (tmp_path / "subspace.safetensors").exists()


KEY_VALUES = {
    "subspace": st.one_of(st.none(), st.just("s.safetensors")),
    "features": st.one_of(st.none(), st.just("f.json")),
    "weight_constraint": st.booleans(),
    "activation_constraint": st.booleans(),
    "rank": st.one_of(st.none(), st.integers(-2, 64)),
    "energy": st.one_of(st.none(), st.floats(-1, 2), st.just(float("nan"))),
    "output_rank": st.one_of(st.integers(-2, 8), st.text(max_size=3)),
    "projection": st.sampled_from(["update", "gradient", "both", 3]),
    "subspace_method": st.sampled_from(["activation", "gradient", "delta", "svd"]),
    "act_lambda": st.one_of(st.floats(-1, 10), st.just(float("nan")), st.just("high")),
    "target_modules": st.one_of(st.lists(st.sampled_from(["q_proj", "down_proj"]), max_size=2), st.just("q_proj")),
    "layers": st.one_of(st.none(), st.lists(st.integers(-2, 4), max_size=3)),
    "typo_key": st.integers(),
}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional=KEY_VALUES))
def test_any_block_either_validates_consistently_or_fails_with_a_validation_error(block):
    """No input crashes the schema with another exception, and what passes is usable."""
    try:
        cfg = CWACConfig(**block)
    except ValidationError as err:
        assert str(err)  # pydantic's message names the failing key
        return
    assert "typo_key" not in block
    assert cfg.weight_constraint or cfg.activation_constraint
    assert not cfg.weight_constraint or cfg.subspace
    assert not cfg.activation_constraint or cfg.features
    assert cfg.rank is None or cfg.rank >= 1
    assert cfg.energy is None or 0 < cfg.energy <= 1
    assert cfg.output_rank >= 0 and cfg.act_lambda >= 0 and cfg.target_modules
    assert cfg.subspace_method != "delta" or cfg.delta_base_model


EXAMPLES = sorted((TESTS_DIR.parent / "examples").rglob("*.yml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_each_example_validates_with_the_plugin_and_is_not_refused(example):
    """What users copy: Axolotl's own validation with the plugin registered keeps the block, both
    constraints are on with the benchmark's settings, and no guard refuses the setup."""
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    from cwac_plugin.guards import refuse_unsupported
    from cwac_plugin.plugin import settings_from

    cfg = DictDefault(yaml.safe_load(example.read_text()))
    prepare_plugins(cfg)
    validated = validate_config(cfg)
    settings = settings_from(validated)
    refuse_unsupported(validated)
    assert settings.weight_constraint and settings.activation_constraint
    assert (settings.subspace_method, settings.rank, settings.output_rank) == ("gradient", 16, 16)
    assert (settings.act_signal, settings.act_scale, settings.act_lambda) == ("preactivation", "spread", 300)
    assert settings.hook_point and settings.sae and settings.features
    artifacts = {settings.subspace, settings.sae, settings.features}
    assert len(artifacts) == 3 and all(str(path).startswith(("runs/", f"{validated.output_dir}/")) for path in artifacts)


@pytest.mark.parametrize(
    ("raw", "sharding"),
    [
        ({"fsdp_version": 2}, "fsdp2"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "zero3"),
        ({"deepspeed": "zero3.json"}, "zero3"),  # a file, read from where the command runs
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, None),  # ZeRO-2 keeps the whole model on every rank
        ({"deepspeed": {"zero_optimization": {"stage": 3}}, "load_in_4bit": True}, None),  # fits one device
        # Axolotl trains with FSDP where fsdp_config is set beside deepspeed: here FSDP1, whole on every rank
        ({"deepspeed": {"zero_optimization": {"stage": 3}}, "fsdp_config": {"reshard_after_forward": True}}, None),
    ],
)
def test_precompute_shards_a_torchrun_job_as_its_training_would(raw, sharding, tmp_path, monkeypatch):
    from cwac_plugin.cli import sharding_for_precompute

    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert sharding_for_precompute(raw, tmp_path / "config.yml") is None  # one process: always whole
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sharding_for_precompute(raw, tmp_path / "config.yml") == sharding


def test_precompute_refuses_a_deepspeed_file_it_cannot_read(tmp_path, monkeypatch):
    import click

    from cwac_plugin.cli import sharding_for_precompute

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(click.UsageError, match=r"config.yml: deepspeed: cannot read missing.json .*fix the path"):
        sharding_for_precompute({"deepspeed": "missing.json"}, tmp_path / "config.yml")
