"""The weight constraint on FSDP2's sharded parameters, in two real gloo processes.

Each rank holds some rows of every parameter (`fully_shard`, `Shard(0)`; LoRA's A with rank 3 splits
unevenly, 2 + 1 rows, and with rank 1 leaves rank 1 no row at all). The ranks train on different data; the whole weights, gathered afterwards and
merged by PEFT, must keep the constraint as on one process, and the logged leakage must say so.
"""

import pytest
import torch

from cwac_plugin.config import DEFAULT_TARGET_MODULES
from cwac_plugin.projection import WeightConstraint

from test_projection import current_weights, leakage_between, random_subspace, tiny_llama
from test_ranks import WORLD, run_ranks


def build(lora_rank: int):
    model = tiny_llama()
    if not lora_rank:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=DEFAULT_TARGET_MODULES, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def shard(model) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def gathered_weights(model, lora_rank: int, names: list[str]) -> dict:
    """The whole weights after training: the shards gathered into an unsharded copy."""
    from torch.distributed.tensor import DTensor

    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    copy = build(lora_rank)
    copy.load_state_dict(state)
    return current_weights(copy, names)


def worker(rank: int, case: str) -> dict:
    training, mode = case.split("-")
    lora_rank = int(training.removeprefix("lora") or 3) if training.startswith("lora") else 0
    model = build(lora_rank)
    subspace = random_subspace(tiny_llama())
    before = current_weights(model, subspace.module_names)
    constraint = WeightConstraint(model, subspace, mode=mode)  # as the plugin: before the wrapper
    shard(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    if mode == "gradient":  # plain SGD: Adam's per-coordinate scaling would leak (README)
        optimizer = torch.optim.SGD(trained, lr=0.5)
    else:
        optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)
    constraint.follow_sharding()  # what CWACCallback.on_train_begin does
    constraint.check_bound(model, optimizer)
    constraint.attach()
    g = torch.Generator().manual_seed(rank)  # each rank its own data, as under data parallelism
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        constraint.project_gradients()  # on_pre_optimizer_step
        optimizer.step()
        optimizer.zero_grad()
        if mode == "update":
            constraint.enforce()  # on_optimizer_step
    reported = constraint.leakage()
    norm, leak_in, leak_out = leakage_between(subspace, before, gathered_weights(model, lora_rank, subspace.module_names))
    return {
        "norm": norm, "leak_in": leak_in, "leak_out": leak_out, "sharded": constraint.sharded,
        "reported_in": reported.input_leakage, "reported_out": reported.output_leakage,
        "reported_norm": reported.update_sq**0.5,
        "rows_of_first": constraint.tensors[0].param.to_local().shape[0],
    }


@pytest.mark.parametrize("case", ["full-update", "lora-update", "lora1-update", "full-gradient", "lora-gradient"])
def test_the_constraint_holds_on_fsdp2_shards(case, tmp_path):
    result = run_ranks(tmp_path, case, target=worker)[0]
    assert result["sharded"]
    assert result["norm"] > 1e-2  # it trained
    assert result["leak_in"] < 1e-5 and result["leak_out"] < 1e-5
    assert result["reported_in"] < 1e-5 and result["reported_out"] < 1e-5
    # the logged ||dW|| sums every rank's rows: exact for LoRA, from the 32-column sketch for full weights
    assert result["reported_norm"] == pytest.approx(result["norm"], rel=1e-4 if case.startswith("lora") else 0.3)
    if case.startswith("lora-"):
        assert result["rows_of_first"] == 2  # rank 0's rows of an A of rank 3
    if case.startswith("lora1"):
        assert result["rows_of_first"] == 1
