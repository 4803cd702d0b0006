"""Finding a model's parts by their base-model names, through PEFT and DeepSpeed wrappers.

The ground floor that the subspace, the projection and the SAE tap all stand on: a subspace file
names modules as the plain transformers model does (`model.layers.3.self_attn.q_proj`), whatever
wraps the model at training time.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable

from torch import Tensor, nn

from cwac_plugin.errors import SAEConfigError, SubspaceError


def base_model_of(model: nn.Module) -> nn.Module:
    """The plain transformers model under DeepSpeed's engine and PEFT's wrapper."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def base_model_peft(model: nn.Module) -> nn.Module:
    """The PEFT model (or plain model) under DeepSpeed's engine."""
    return getattr(model, "module", model)


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """transformers' causal LMs take `logits_to_keep`: their LM head then runs on those positions only."""
    return "logits_to_keep" in inspect.signature(base_model_of(model).forward).parameters


def is_lora_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def linear_of(module: nn.Module) -> nn.Module:
    """The linear layer holding the base weight (PEFT wraps it as `base_layer`)."""
    return module.get_base_layer() if is_lora_wrapper(module) else module


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def find_target_modules(
    model: nn.Module, target_modules: Iterable[str], layers: Iterable[int] | None = None
) -> dict[str, nn.Module]:
    """Linear modules whose last name component is in `target_modules` (base-model names)."""
    targets = set(target_modules)
    wanted_layers = set(layers) if layers is not None else None
    found = {}
    for name, module in base_model_of(model).named_modules():
        if name.rsplit(".", 1)[-1] not in targets or not isinstance(linear_of(module), nn.Linear):
            continue
        if wanted_layers is not None:
            match = _LAYER_INDEX.search(f".{name}.")
            if match is None or int(match.group(1)) not in wanted_layers:
                continue
        found[name] = module
    return found


def resolve_modules(model: nn.Module, names: Iterable[str], source: str) -> dict[str, nn.Module]:
    """Look modules up by base-model name; a missing one means the subspace is for another model."""
    available = dict(base_model_of(model).named_modules())
    missing = [name for name in names if name not in available]
    if missing:
        raise SubspaceError(
            f"{source} protects modules this model does not have (e.g. {missing[0]!r}; "
            f"{len(missing)} missing): it was computed for another model. Rerun `cwac subspace` "
            "on this model, or point cwac.subspace at the right file"
        )
    return {name: available[name] for name in names}


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear layer, also when 4-bit packed or ZeRO-3 partitioned."""
    linear = linear_of(module)
    return linear.out_features, linear.in_features


def dense_weight(module: nn.Module) -> Tensor:
    """The float32 weight of a linear layer, dequantising bitsandbytes 4-bit weights and gathering
    FSDP2's rows (a collective: every rank must ask for the same weights in the same order)."""
    linear = linear_of(module)
    weight = linear.weight
    if hasattr(weight, "full_tensor"):
        return weight.detach().full_tensor().float()
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


def model_metadata(model: nn.Module) -> dict[str, str]:
    config = base_model_of(model).config
    return {
        "model": str(getattr(config, "_name_or_path", "")),
        "model_type": str(getattr(config, "model_type", "")),
        "hidden_size": str(getattr(config, "hidden_size", "")),
        "num_hidden_layers": str(getattr(config, "num_hidden_layers", "")),
    }


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for name, module in base_model_of(model).named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module):
            return module
    raise SAEConfigError("found no decoder layer list (a ModuleList named `layers`) in the model")
