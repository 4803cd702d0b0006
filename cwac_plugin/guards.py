"""Configurations in which the weight constraint would not hold: refused before the first step.

Two kinds of check. Axolotl keys that set up a training the constraint cannot follow are refused
from the config alone, before the model is loaded (`refuse_unsupported`). What the keys cannot
tell, the model shows: which trainable parameters the subspace covers (`coverage_of`), and
whether each LoRA adapter starts at zero (checked where the adapters are bound, in projection.py;
that is where an adapter loaded with `lora_model_dir` is judged: a saved zero initialisation is
fine, a trained adapter is refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from cwac_plugin.errors import SubspaceError
from cwac_plugin.models import base_model_of

# Below this share of the trainable decoder parameters the run is refused unless cwac.allow_partial:
# a Llama's norms are ~0.01% of a layer, so any real gap (experts, fused modules, a layer subset) is
# far below it.
MIN_COVERAGE = 0.9

# LoRA initialisations under which B0 A0 = 0, so that dW = s B A: PEFT's default and its Gaussian A.
ZERO_START_INITS = (None, True, "gaussian")


def refuse_unsupported(cfg) -> None:
    """Raise for Axolotl settings under which the constraint would silently not hold."""
    get = cfg.get
    fsdp_config = get("fsdp_config") or {}
    if get("fsdp"):
        raise SubspaceError(
            "fsdp: the legacy FSDP1 list is not supported (the constraint follows FSDP2's sharded "
            "parameters only). Replace it with fsdp_version: 2 and an fsdp_config block"
        )
    if (fsdp_config or get("fsdp_version")) and str(get("fsdp_version") or fsdp_config.get("fsdp_version")) != "2":
        raise SubspaceError(
            f"fsdp_version: {get('fsdp_version') or fsdp_config.get('fsdp_version')!r}: cwac_plugin follows FSDP2's "
            "sharded parameters, not FSDP1's flat ones (deprecated in Axolotl). Set fsdp_version: 2"
        )
    for key in ("tensor_parallel_size", "dp_replicate_size"):
        if (get(key) or 1) > 1:
            raise SubspaceError(
                f"{key}: {get(key)}: tensor parallelism and HSDP shard parameters in ways the weight constraint "
                f"does not follow (it follows FSDP2's Shard(0) over one mesh dimension). Remove {key}"
            )
    final_save = fsdp_config.get("final_state_dict_type") or fsdp_config.get("state_dict_type")
    if final_save == "SHARDED_STATE_DICT" and not get("adapter") and not (get("bf16") or get("fp16")):
        raise SubspaceError(
            "fsdp_config.state_dict_type: SHARDED_STATE_DICT: for the final model Axolotl merges the shards into "
            "bfloat16 weights, whose rounding of W hides what the float32 training kept out of the subspace, so "
            "`cwac verify` could not show it. Set fsdp_config.final_state_dict_type: FULL_STATE_DICT (checkpoints "
            "can stay sharded)"
        )
    if fsdp_config.get("cpu_ram_efficient_loading"):
        raise SubspaceError(
            "fsdp_config.cpu_ram_efficient_loading: ranks other than 0 then load no weights, and the "
            "constraint takes R = W0 U from the weights before sharding. Set it to false (or use "
            "DeepSpeed ZeRO-3 with zero3_init for models that do not fit in host memory)"
        )
    if get("relora"):
        raise SubspaceError(
            "relora: ReLoRA merges the adapter into the base weight and restarts it, which the weight "
            "constraint does not follow. Remove `relora` (train one LoRA adapter)"
        )
    if not get("adapter"):
        return
    if get("peft_init_lora_weights") not in ZERO_START_INITS:
        raise SubspaceError(
            f"peft_init_lora_weights: {get('peft_init_lora_weights')!r} starts the adapter at B0 A0 != 0 "
            "(with the base weight changed to compensate, for PiSSA/OLoRA/CorDA/EVA), so the constraint on "
            "B A would not hold on the effective weight. Remove peft_init_lora_weights (PEFT's default "
            "init starts at zero)"
        )
    if (get("peft") or {}).get("loftq_config"):
        raise SubspaceError(
            "peft.loftq_config: LoftQ starts the adapter at B0 A0 != 0 to offset quantisation, so the "
            "constraint on B A would not hold on the effective weight. Remove peft.loftq_config"
        )
    if get("peft_use_dora"):
        raise SubspaceError(
            "peft_use_dora: DoRA changes the weight through a magnitude vector that CWAC cannot project; "
            "set peft_use_dora: false (plain LoRA)"
        )


@dataclass
class Coverage:
    """How much of what the optimizer trains in the decoder layers the subspace protects."""

    protected: int
    trainable_decoder: int
    trainable: int
    unprotected: list[str] = field(default_factory=list)  # trainable decoder parameters, largest first

    @property
    def share(self) -> float:
        return self.protected / self.trainable_decoder if self.trainable_decoder else 1.0

    def describe(self) -> str:
        return (
            f"{self.share:.1%} of trainable decoder parameters ({self.protected:,} of "
            f"{self.trainable_decoder:,}; {self.trainable:,} trainable in all)"
        )

    @property
    def partial(self) -> bool:
        return self.share < MIN_COVERAGE

    def check(self, allow_partial: bool) -> None:
        if not self.partial or allow_partial:
            return
        raise SubspaceError(
            f"cwac.target_modules: the subspace protects only {self.describe()}; unprotected are e.g. "
            f"{', '.join(self.unprotected[:4])}. Protect them (add their names to cwac.target_modules, "
            "or drop cwac.layers, and rerun `cwac subspace`), freeze them, or set cwac.allow_partial: true "
            "to train them unconstrained on purpose. Mixture-of-experts expert weights (3-D parameters) "
            "cannot be protected yet"
        )


def _numel(param: nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 shards report their full size here


def decoder_prefix(parameter_names) -> str:
    """`model.layers.` for transformers' decoders (parameter names `<prefix>N.<...>`); '' if none."""
    for name in parameter_names:
        head, sep, _ = name.partition(".layers.")
        if sep:
            return f"{head}.layers."
    return ""


def coverage_of(model: nn.Module, protected: list[nn.Parameter]) -> Coverage:
    """Share of the trainable decoder-layer parameters that are among `protected` (by size)."""
    base = base_model_of(model)
    protected_ids = {id(p) for p in protected}
    trainable = [(name, p) for name, p in base.named_parameters() if p.requires_grad]
    prefix = decoder_prefix(name for name, _ in base.named_parameters())
    decoder = [(name, p) for name, p in trainable if name.startswith(prefix)]
    unprotected = sorted((p for p in decoder if id(p[1]) not in protected_ids), key=lambda p: -_numel(p[1]))
    return Coverage(
        protected=sum(_numel(p) for _, p in decoder if id(p) in protected_ids),
        trainable_decoder=sum(_numel(p) for _, p in decoder),
        trainable=sum(_numel(p) for _, p in trainable),
        unprotected=[name for name, _ in unprotected],
    )

