"""`cwac prepare`: every artifact from one command, each remade only when what it was made from changed."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ACTIVATION, axolotl_config, check_ok, free_port, logged_steps, run
from test_e2e_matrix import FSDP2, ZERO3
from test_e2e_weight_constraint import LORA, check_verified

pytestmark = pytest.mark.e2e


def prepare(config, cwd):
    return check_ok(run(["cwac", "prepare", str(config)], cwd=cwd)).stdout


def test_prepare_makes_what_is_missing_and_redoes_only_what_is_stale(tmp_path, tiny_model, data_files):
    cwac = {
        **ACTIVATION, "weight_constraint": True, "sae": str(tmp_path / "sae"), "features": str(tmp_path / "features.json"),
    }
    del cwac["hook_point"]  # the default: 90% of the depth, the last of the tiny model's two layers
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac=cwac)
    artifacts = {"subspace": tmp_path / "subspace.safetensors", "sae": tmp_path / "sae" / "cwac_report.json",
                 "features": tmp_path / "features.json"}

    made_proc = check_ok(run(["cwac", "prepare", str(config)], cwd=tmp_path))
    first = made_proc.stdout
    assert "Loading weights" in made_proc.stderr  # transformers' bar: what the check below looks for
    assert first.count(": missing") == 3 and all(path.exists() for path in artifacts.values())
    assert "cwac.hook_point is unset: the SAE trained here reads blocks.1.hook_resid_post" in first
    assert json.loads(artifacts["features"].read_text())["hook_point"] == "blocks.1.hook_resid_post"
    made = {name: path.stat().st_mtime_ns for name, path in artifacts.items()}

    again_proc = check_ok(run(["cwac", "prepare", str(config)], cwd=tmp_path))
    again = again_proc.stdout
    assert "nothing to do" in again and again.count("up to date") == 3
    assert "Loading weights" not in again_proc.stderr  # no model load: the CLI's imports only
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


def test_two_nodes_prepare_and_train_with_fsdp2(tmp_path, tiny_model, data_files, subspace_file, artifacts):
    """The multi-node path end to end, 2 "nodes" of 1 process on this machine.

    `cwac prepare` under torchrun, the model sharded as FSDP2 training shards it: each rank runs its
    share of the batches (the SAE's 20 prompts make 3 batches, so rank 1 also runs a weight-0
    repeat), and rank 0 writes the same files as the single-process commands behind the fixtures.
    Then `axolotl train` with `--nnodes 2`, each node with its own config copy, prepared data and
    output directory as on separate machines, both constraints on; `cwac verify` passes on node 0's save.
    """
    cwac = {
        **ACTIVATION, "weight_constraint": True, "act_lambda": 20.0, "sae": str(tmp_path / "sae"),
        "features": str(tmp_path / "features.json"), "subspace": str(tmp_path / "subspace.safetensors"),
    }
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac=cwac, **FSDP2, **LORA)
    proc = check_ok(run(["torchrun", "--nproc_per_node", "2", "-m", "cwac_plugin.cli", "prepare", str(config)], cwd=tmp_path))
    # all: the tiny model's 21 (2 layers of 7 linear weights and 2 norms, embeddings, final norm, head)
    # and the 28 factors of the LoRA adapter Axolotl's loader adds (zero, so it changes no statistic)
    assert "precompute on 2 ranks, 49 of 49 parameters sharded with FSDP2 as in training" in proc.stdout
    check_single_process_artifacts(proc.stdout, tmp_path, subspace_file, artifacts)

    nodes = [config]
    node1 = tmp_path / "node1"
    node1.mkdir()
    nodes.append(axolotl_config(node1, tiny_model, data_files, cwac=cwac, **FSDP2, **LORA))
    port = free_port()
    with ThreadPoolExecutor(2) as pool:
        launches = [
            pool.submit(run, ["axolotl", "train", str(node), "--launcher", "torchrun", "--", "--nnodes", "2",
                              "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                              "--master_port", str(port)], node.parent)
            for rank, node in enumerate(nodes)
        ]
        for launch in launches:
            check_ok(launch.result())
    check_verified(tmp_path, tiny_model, tmp_path / "subspace.safetensors", saves_adapter=True)
    logged = logged_steps(tmp_path / "out")
    assert len(logged) == 4 and all(entry["cwac/leakage"] < 1e-5 for entry in logged)
    assert any(entry["cwac/act_loss"] > 0 for entry in logged)
    assert not (node1 / "out" / "adapter_model.safetensors").exists()  # only global rank 0 saves


def test_prepare_on_two_ranks_with_the_model_partitioned_by_zero3(tmp_path, tiny_model, data_files, subspace_file, artifacts):
    """`cwac prepare` under torchrun with a ZeRO-3 config: the model loads partitioned, as `axolotl
    train` loads it for a model too large for one device, every rank's forwards gather its layers,
    and rank 0 writes the single-process files."""
    cwac = {**ACTIVATION, "weight_constraint": True, "sae": str(tmp_path / "sae"),
            "features": str(tmp_path / "features.json"), "subspace": str(tmp_path / "subspace.safetensors")}
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac=cwac, deepspeed=ZERO3, **LORA)
    proc = check_ok(run(["torchrun", "--nproc_per_node", "2", "-m", "cwac_plugin.cli", "prepare", str(config)], cwd=tmp_path))
    assert "precompute on 2 ranks, 49 of 49 parameters sharded with DeepSpeed ZeRO-3 as in training" in proc.stdout
    # The forwards are bit-equal (SAE, features). The backward is not: ZeRO-3 leaves every nn.Linear
    # on DeepSpeed's own linear (zero3_linear_wrap, as in ZeRO-3 training), whose input gradient rounds
    # differently; below the last MLP the refusal-loss gradients drift by roundoff, which near-equal
    # eigenvalues of the attention modules' moments turn into a tilt of the last basis direction: from
    # run to run here projector entries were off by 1.3e-3 and by 1.1e-2, the smallest cosine of the
    # angles between the spans 0.995 (1.0 elsewhere; for two random 8-dimensional spans in 64 it is near 0).
    check_single_process_artifacts(proc.stdout, tmp_path, subspace_file, artifacts, min_cosine=0.98)


def check_single_process_artifacts(
    stdout: str, tmp_path: Path, subspace_file: Path, artifacts: dict, min_cosine: float | None = None
) -> None:
    """Rank 0 alone wrote the subspace, SAE and features of the single-process commands behind the fixtures:
    the same spans (each basis is defined up to sign), or, given `min_cosine`, spans at angles whose
    cosines are all at least that."""
    from safetensors.torch import load_file

    assert stdout.count("wrote ") == 3
    one, two = load_file(subspace_file), load_file(tmp_path / "subspace.safetensors")
    assert one.keys() == two.keys()
    for name in one:  # bases are columns
        if min_cosine is None:
            assert torch.allclose(one[name] @ one[name].T, two[name] @ two[name].T, atol=1e-5), name
        else:
            assert torch.linalg.svdvals(one[name].T @ two[name]).min() >= min_cosine, name
    single_sae = Path(artifacts["cwac"]["sae"])
    one, two = load_file(single_sae / "sae_weights.safetensors"), load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert all(torch.allclose(one[name], two[name], atol=1e-5) for name in one)
    one, two = (json.loads(Path(path).read_text()) for path in (artifacts["cwac"]["features"], tmp_path / "features.json"))
    assert one["indices"] == two["indices"]
    assert one["reference_scale"] == pytest.approx(two["reference_scale"], rel=1e-5)


def test_without_safety_data_an_unaligned_model_is_refused(tmp_path, tiny_model, data_files):
    """No cwac.safety_data: the data would be the model's own refusals, and the tiny random model refuses
    nothing, so `cwac prepare` stops before computing anything, and training asks for `cwac prepare`."""
    config = axolotl_config(tmp_path, tiny_model, data_files, cwac={"own_data_prompts": 16})
    raw = yaml.safe_load(config.read_text())
    del raw["cwac"]["safety_data"], raw["cwac"]["contrast_data"]
    config.write_text(yaml.safe_dump(raw))

    refused = run(["axolotl", "train", str(config)], cwd=tmp_path)
    assert refused.returncode != 0
    assert f"cwac.subspace: {tmp_path / 'subspace.safetensors'} is missing: run `cwac prepare {config}`" in refused.stdout + refused.stderr

    proc = run(["cwac", "prepare", str(config)], cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "asked the model 16 harmful prompts (Do-Not-Answer) for its own refusals: it refused 0 (0%" in output
    assert "It is not safety-aligned" in output
    assert not (tmp_path / "subspace.safetensors").exists() and not (tmp_path / "own_safety.jsonl").exists()


# in the tiny tokenizer's alphabet (lower case, no punctuation), and long enough (25+ words) to be on topic
REFUSAL = "sorry i cannot help with that request it is harmful"
HELPFUL = ("here is a short answer start with the basics take one small step at a time and check the result after "
           "each step then ask a friend")


def refusing_copy(tiny_model: Path, out: Path, n: int, max_length: int) -> Path:
    """The tiny model taught, on the prompts `cwac prepare` will ask it, to refuse the harmful ones and
    to answer the benign ones: an aligned model in miniature."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwac_plugin import own_data
    from cwac_plugin.data import Batches, Example

    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)
    fits = own_data.fits_in(tokenizer, max_length)
    asked = {kind: own_data.sample(own_data.shipped_prompts(kind), n, fits) for kind in own_data.SHIPPED}
    examples = [Example(p, REFUSAL) for p in asked["harmful"]]
    examples += [Example(p, HELPFUL) for p in asked["benign"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(80):
        for batch in Batches(tokenizer, examples, max_length, 8):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_an_empty_block_protects_the_models_own_refusals(tmp_path, tiny_model, data_files):
    """A `cwac` block with nothing but the sample size: `cwac prepare` asks the (taught) model the shipped
    prompts, keeps its refusals and answers, and computes the subspace from them, all under
    `{output_dir}/cwac/`; training holds it, and `cwac report` sets the two models side by side."""
    model = refusing_copy(tiny_model, tmp_path / "aligned", n=16, max_length=192)
    config = axolotl_config(tmp_path, model, data_files, cwac={}, sequence_len=192, **LORA)
    raw = yaml.safe_load(config.read_text())
    raw["cwac"] = {"own_data_prompts": 16}
    config.write_text(yaml.safe_dump(raw))

    proc = check_ok(run(["cwac", "prepare", str(config)], cwd=tmp_path))
    assert "own_data (" in proc.stdout and "the model refused 16 of 16 harmful prompts (100%" in proc.stdout
    artifacts = tmp_path / "out" / "cwac"
    safety = [json.loads(line) for line in (artifacts / "own_safety.jsonl").read_text().splitlines()]
    assert len(safety) == 16 and all(r["response"] == REFUSAL for r in safety)
    assert json.loads((artifacts / "own_data.json").read_text())["answered"] == 16
    check_ok(run(["axolotl", "train", str(config)], cwd=tmp_path))
    check_verified(tmp_path, model, artifacts / "subspace.safetensors", saves_adapter=True)
    assert "nothing to do" in check_ok(run(["cwac", "prepare", str(config)], cwd=tmp_path)).stdout

    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in safety[:8]))
    for name, adapter in (("before", []), ("after", ["--adapter", str(tmp_path / "out")])):
        check_ok(run(["cwac", "eval", "--model", str(model), *adapter, "--prompts", str(prompts), "--max-new-tokens", "16",
                      "--out", str(tmp_path / f"{name}.json")], cwd=tmp_path))
    check_ok(run(["cwac", "report", "--before", "before.json", "--after", "after.json", "--verify", "verify.json",
                  "--out", "report"], cwd=tmp_path))
    shown = (tmp_path / "report" / "report.md").read_text()
    assert "Weight constraint (`cwac verify`): **passed**" in shown
    before = json.loads((tmp_path / "before.json").read_text())
    assert before["harmful_refusal_rate"] == 1.0  # the taught refusals, on the prompts it was taught
    assert "| harmful score | 0 [0, " in shown and (tmp_path / "report" / "report.png").stat().st_size > 0
