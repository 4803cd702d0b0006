"""Precompute across the processes of a torchrun job: every rank takes its share of the batches,
and what they measured comes together, summed on every rank or gathered on the first, which alone
writes the artifact.

Batch j goes to rank j mod world, whole, so the per-batch statistics and their sums are the
single-process ones up to float summation order. A sharded model's forward is a collective (FSDP2
gathers each layer's rows from every rank), so every rank runs the same number of forwards: a rank
whose share is shorter runs one batch again and counts it with weight 0.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor
from torch import distributed as dist
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from cwac_plugin.data import Batches

Item = TypeVar("Item")  # a batch of precompute, or a prompt to answer (own_data)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_distributed() -> bool:
    """Started by torchrun (or accelerate launch) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group() -> None:
    """Join the torchrun job before anything loads: Axolotl's loader on a CPU machine would not
    (accelerate leaves a CPU torchrun job undistributed), and each rank would then do all the work."""
    if launched_distributed() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def _collective_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def my_share(items: Collection[Item]) -> Iterator[tuple[int, Item, float]]:
    """(index, item, weight) of this rank's items: weight 1, then weight-0 repeats up to the
    longest share, so that every rank runs as many forwards as the others."""
    here, world = rank(), world_size()
    done, first, last = 0, None, None
    for index, item in enumerate(items):
        first = item if first is None else first
        if index % world == here:
            last = item
            done += 1
            yield index, item, 1.0
    for _ in range(share_length(items) - done):
        yield -1, last if last is not None else first, 0.0


def share_length(batches: Collection) -> int:
    """How many forwards `my_share` runs: what a progress bar counts."""
    return -(-len(batches) // world_size())


def progress(batches: Batches, desc: str) -> Iterator[tuple[int, dict[str, Tensor], float]]:
    """`my_share(batches)` with a progress bar on the first rank."""
    return tqdm(
        my_share(batches), desc=desc, unit="batch", total=share_length(batches), disable=not is_main_process()
    )


def barrier() -> None:
    """Wait for every rank: after the first rank wrote what the others read next."""
    if world_size() > 1:
        dist.barrier()


def sum_over_ranks(sums: dict[str, Tensor], *counts: int) -> tuple[int, ...]:
    """Sum `sums` in place over ranks (every rank holds the same keys) and return the summed counts."""
    if world_size() == 1:
        return counts
    for name in sorted(sums):
        dist.all_reduce(sums[name])
    totals = torch.tensor(counts, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(totals)
    return tuple(int(total) for total in totals.tolist())


def gather_in_order(rows: list[tuple[int, object]], everywhere: bool = False) -> list | None:
    """Every rank's (index, item) pairs, as the items in index order on the first rank (None on
    the others), or on every rank with `everywhere`; weight-0 repeats must be left out of `rows`.
    Tensors travel on the CPU."""
    if world_size() > 1:
        if everywhere:
            gathered = [None] * world_size()
            dist.all_gather_object(gathered, rows)
        else:
            gathered = [None] * world_size() if is_main_process() else None
            dist.gather_object(rows, gathered, dst=0)
            if not is_main_process():
                return None
        rows = [row for part in gathered for row in part]
    return [item for _, item in sorted(rows, key=lambda row: row[0])]


def shard_like_training(model: torch.nn.Module, micro_batch_size: int) -> torch.nn.Module:
    """Shard `model` as `axolotl train` would, from the settings Axolotl's config loader put in the
    environment, through accelerate's own preparation.

    FSDP2: `fsdp2_prepare_model`, so wrapping, resharding after forward and (with
    fsdp_config.cpu_ram_efficient_loading) broadcasting rank 0's weights are its. ZeRO-3: the model
    loaded partitioned already (transformers' `zero.Init`); `prepare` of the model alone, as the HF
    Trainer's evaluation does it, gives DeepSpeed's engine without an optimizer, whose hooks gather
    each layer's partitions for its forward. The model itself is returned: the hooks sit on its
    modules, which keep their names (the engine would prefix them with `module.`), and hold the
    engine alive."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    if accelerator.state.deepspeed_plugin is None:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model)
    deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):  # nothing is stepped
        deepspeed_config.pop(section, None)
    if deepspeed_config.get("train_micro_batch_size_per_gpu") == "auto":  # as Axolotl's ZeRO-3 loading fills it
        deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size  # (an explicit train_batch_size must match)
    return accelerator.prepare(model).module
