"""`cwac prepare`: every artifact from one command, each remade only when what it was made from changed."""

import time

import pytest
import yaml

from conftest import ACTIVATION, axolotl_config, check_ok, run

pytestmark = pytest.mark.e2e


def prepare(config, cwd):
    return check_ok(run(["cwac", "prepare", str(config)], cwd=cwd)).stdout


def test_prepare_makes_what_is_missing_and_redoes_only_what_is_stale(tmp_path, tiny_model, data_files):
    cwac = {
        **ACTIVATION, "weight_constraint": True, "sae": str(tmp_path / "sae"), "features": str(tmp_path / "features.json"),
    }
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac=cwac)
    artifacts = {"subspace": tmp_path / "subspace.safetensors", "sae": tmp_path / "sae" / "cwac_report.json",
                 "features": tmp_path / "features.json"}

    first = prepare(config, tmp_path)
    assert first.count(": missing") == 3 and all(path.exists() for path in artifacts.values())
    made = {name: path.stat().st_mtime_ns for name, path in artifacts.items()}

    start = time.perf_counter()
    again = prepare(config, tmp_path)
    assert "nothing to do" in again and again.count("up to date") == 3
    assert time.perf_counter() - start < 30  # no model load: the CLI's imports only
    assert {name: path.stat().st_mtime_ns for name, path in artifacts.items()} == made

    raw = yaml.safe_load(config.read_text())
    raw["cwac"]["rank"] = 16
    config.write_text(yaml.safe_dump(raw))
    refused = run(["axolotl", "train", str(config)], cwd=tmp_path)
    assert refused.returncode != 0
    assert f"is stale (settings.rank: 8 -> 16): run `cwac prepare {config}`" in refused.stdout + refused.stderr

    redone = prepare(config, tmp_path)
    assert "settings.rank: 8 -> 16" in redone and redone.count("up to date") == 2
    remade = {name: path.stat().st_mtime_ns for name, path in artifacts.items()}
    assert remade["subspace"] != made["subspace"]
    assert remade["sae"] == made["sae"] and remade["features"] == made["features"]

    raw["cwac"]["sae_k"] = 8
    config.write_text(yaml.safe_dump(raw))
    assert "its SAE is remade" in prepare(config, tmp_path)  # a new SAE takes new features with it
