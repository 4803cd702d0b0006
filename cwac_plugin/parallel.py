"""Reading and writing the parameters the optimizer steps, whatever shards or shadows them.

- Plain and DDP: the parameter itself.
- DeepSpeed ZeRO: the optimizer owns an fp32 master copy that overwrites the model's parameter at
  the next step, and ZeRO-3 partitions the parameter itself, so edits go through DeepSpeed, which
  gathers the full parameter (a collective per parameter).
- FSDP2: `fully_shard` replaces each parameter by a DTensor holding this rank's rows (`Shard(0)`),
  and the optimizer steps those rows. Nothing is gathered: `read_param`/`write_param` work on the
  local rows, and the one product that spans rows (`V^T X` of the output side) is summed over the
  shard group by `RowShards.sum`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from cwac_plugin.errors import SubspaceError


def _owned_by_deepspeed_optimizer(param: Tensor) -> bool:
    return hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping")


def _managed_by_deepspeed(param: Tensor) -> bool:
    """Partitioned (ZeRO-3) or shadowed by an fp32 master copy (ZeRO-1/2): edits go through DeepSpeed."""
    return hasattr(param, "ds_id") or _owned_by_deepspeed_optimizer(param)


@contextmanager
def _gathered(param: Tensor, modify: bool) -> Iterator[None]:
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None):
            yield
    else:
        yield


def is_row_sharded(param: Tensor) -> bool:
    """An FSDP2 parameter: a DTensor (imported lazily: older torch builds lack it)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


@dataclass(frozen=True)
class RowShards:
    """Where this rank's rows of an FSDP2 parameter sit in the full one, and how to sum over ranks."""

    rows: slice
    group: object  # the process group of the shard dimension

    @classmethod
    def of(cls, param: Tensor) -> RowShards:
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if tuple(param.placements) != (Shard(0),):
            raise SubspaceError(
                f"cwac_plugin supports FSDP2 parameters sharded on dim 0 over one mesh dimension, got "
                f"{param.placements} (HSDP or tensor parallelism): train with plain FSDP2 (no dp_replicate_size "
                "or tensor_parallel_size)"
            )
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return cls(slice(offset[0], offset[0] + shape[0]), param.device_mesh.get_group())

    def sum(self, partial: Tensor) -> Tensor:
        """Sum, over the ranks, each rank's product over its own rows (in place, and returned)."""
        torch.distributed.all_reduce(partial, group=self.group)
        return partial


def read_model_param(param: Tensor) -> Tensor:
    """The full parameter the forward runs and a save writes (DeepSpeed's bf16 copy, not its fp32
    master), in float32. Collective under ZeRO-3 and FSDP2."""
    if is_row_sharded(param):
        return param.detach().full_tensor().float()
    with _gathered(param, modify=False):
        return param.data.detach().float().clone()


def read_param(param: Tensor) -> Tensor:
    """What this rank's optimizer steps, in float32: the full parameter (the master copy under ZeRO,
    gathered under ZeRO-3), or this rank's rows of it under FSDP2."""
    if is_row_sharded(param):
        return param.detach().to_local().float()
    if _owned_by_deepspeed_optimizer(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().float()
    return read_model_param(param)


@torch.no_grad()
def write_param(param: Tensor, value: Tensor) -> None:
    """Write a value shaped like `read_param(param)` back, also to DeepSpeed's fp32 master copy."""
    if is_row_sharded(param):
        param.to_local().copy_(value)
        return
    if _owned_by_deepspeed_optimizer(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())
    with _gathered(param, modify=True):
        if param.data.numel():  # ranks other than the modifier hold an empty tensor under ZeRO-3
            param.data.copy_(value.to(param.dtype).view_as(param.data))


def is_sharded(param: Tensor) -> bool:
    """Partitioned by ZeRO-3 or FSDP2: whole only inside a forward that runs to the end."""
    return hasattr(param, "ds_id") or is_row_sharded(param)


def sharded_parameters(model) -> bool:
    """ZeRO-3 or FSDP2: every rank must run each forward, which is a collective."""
    return any(is_sharded(p) for p in model.parameters())
