"""Reading and writing the parameters the optimizer steps, whatever shards or shadows them.

Under DeepSpeed ZeRO the optimizer owns an fp32 master copy that overwrites the model's parameter at
the next step, and ZeRO-3 partitions the parameter itself, so edits must go through DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


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


def read_model_param(param: Tensor) -> Tensor:
    """The full parameter the forward runs and a save writes (DeepSpeed's bf16 copy, not its fp32
    master), in float32. Collective under ZeRO-3."""
    with _gathered(param, modify=False):
        return param.data.detach().float().clone()


def read_full_param(param: Tensor) -> Tensor:
    """The full parameter in float32 as the optimizer holds it (the master copy under ZeRO)."""
    if _owned_by_deepspeed_optimizer(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().float()
    return read_model_param(param)


@torch.no_grad()
def write_full_param(param: Tensor, value: Tensor) -> None:
    """Write a full-shape value to the parameter and, under ZeRO, to its fp32 master copy."""
    if _owned_by_deepspeed_optimizer(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())
    with _gathered(param, modify=True):
        if param.data.numel():  # ranks other than the modifier hold an empty tensor under ZeRO-3
            param.data.copy_(value.to(param.dtype).view_as(param.data))
