"""Proof from the saved artifacts alone that a fine-tune kept out of the safety subspace.

The training log can only say what the plugin saw; if the plugin never loaded (Axolotl trains on
after "Failed to load plugin"), there is no log to read. `verify` needs only the aligned model, what
training saved and the subspace file: it merges the adapter with PEFT's own code (or reads the full
model), takes every changed weight, and measures the update on the protected modules:

    input leakage   ||dW U||_F / ||dW||_F        output leakage   ||V^T dW||_F / ||dW||_F

summed over modules, plus the share of the changed decoder parameters that are protected at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cwac_plugin.errors import SubspaceError
from cwac_plugin.guards import MIN_COVERAGE, decoder_prefix
from cwac_plugin.subspace import Subspace

DEFAULT_TOLERANCE = 1e-5
# Above this, a half-precision save's rounding hides more than an update that leaks a few percent: such a
# save cannot show the constraint, and `cwac verify` says so instead of passing.
MAX_ROUNDING_TOLERANCE = 1e-2
# Unit roundoff of a half-precision save: each stored element may be off by this share of itself,
# so a bf16 factor A with A U = 0 in float32 reads back with ||A U|| up to this share of ||A||, and a
# bf16-stored full weight W with (W - W0) U = 0 reads back with ||dW U|| up to this share of ||W||.
ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclass
class ModuleLeakage:
    update_norm: float
    input_leakage: float
    output_leakage: float


@dataclass
class Verification:
    modules: dict[str, ModuleLeakage]
    update_sq: float
    input_leak_sq: float
    output_leak_sq: float
    changed_decoder_params: int
    protected_changed_params: int
    saved_dtype: torch.dtype
    unprotected_changed: list[str] = field(default_factory=list)
    full_weight_sq: float = 0.0  # sum of ||W_saved||^2 over protected modules of a saved full model, else 0

    @property
    def input_leakage(self) -> float:
        return _ratio(self.input_leak_sq, self.update_sq)

    @property
    def output_leakage(self) -> float:
        return _ratio(self.output_leak_sq, self.update_sq)

    @property
    def coverage(self) -> float:
        return self.protected_changed_params / self.changed_decoder_params if self.changed_decoder_params else 1.0

    @property
    def default_tolerance(self) -> float:
        """1e-5, or what storing the weights at half precision allows: the unit roundoff u of the saved
        factors (adapters), or u ||W|| / ||dW|| for full weights, whose rounding scales with W, not dW."""
        roundoff = ROUNDOFF.get(self.saved_dtype, 0.0)
        if self.full_weight_sq and self.update_sq:
            roundoff *= math.sqrt(self.full_weight_sq / self.update_sq)
        return max(DEFAULT_TOLERANCE, roundoff)

    def failures(self, tolerance: float | None = None, allow_partial: bool = False) -> list[str]:
        problems = []
        if tolerance is None and self.default_tolerance > MAX_ROUNDING_TOLERANCE:
            problems.append(
                f"inconclusive: the {str(self.saved_dtype).removeprefix('torch.')} save rounds W by more than the update "
                f"can show (bound {self.default_tolerance:.1e} > {MAX_ROUNDING_TOLERANCE:.0e}); save the weights in float32 "
                "(FSDP2: fsdp_config.final_state_dict_type: FULL_STATE_DICT)"
            )
        tolerance = self.default_tolerance if tolerance is None else tolerance
        for side, value in (("input", self.input_leakage), ("output", self.output_leakage)):
            if value > tolerance:
                problems.append(f"{side} leakage {value:.2e} > tolerance {tolerance:.0e}")
        if self.coverage < MIN_COVERAGE and not allow_partial:
            problems.append(
                f"only {self.coverage:.1%} of the changed decoder parameters are protected "
                f"(unprotected: {', '.join(self.unprotected_changed[:4])})"
            )
        return problems

    def summary(self) -> dict:
        return {
            "update_norm": math.sqrt(self.update_sq),
            "input_leakage": self.input_leakage,
            "output_leakage": self.output_leakage,
            "coverage": self.coverage,
            "changed_decoder_params": self.changed_decoder_params,
            "saved_dtype": str(self.saved_dtype).removeprefix("torch."),
            "unprotected_changed": self.unprotected_changed,
        }

    def table(self) -> str:
        rows = [f"{'module':<48} {'||dW||':>10} {'input':>10} {'output':>10}"]
        for name, m in self.modules.items():
            rows.append(f"{name:<48} {m.update_norm:>10.3e} {m.input_leakage:>10.2e} {m.output_leakage:>10.2e}")
        rows.append(
            f"{'all protected modules':<48} {math.sqrt(self.update_sq):>10.3e} "
            f"{self.input_leakage:>10.2e} {self.output_leakage:>10.2e}"
        )
        rows.append(
            f"coverage: {self.coverage:.1%} of {self.changed_decoder_params:,} changed decoder parameters are "
            f"protected; saved weights {str(self.saved_dtype).removeprefix('torch.')}"
        )
        if self.default_tolerance > DEFAULT_TOLERANCE:
            rows.append(
                f"half-precision save: leakage is bounded only by its rounding, {self.default_tolerance:.1e} "
                "(save in float32 for the 1e-5 bound)"
            )
        return "\n".join(rows)


def _load(path: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _stored_dtype(directory: Path, pattern: str) -> torch.dtype:
    """The dtype a trained weight was saved in (the first linear weight or LoRA factor found)."""
    from safetensors import safe_open

    for file in sorted(directory.glob(pattern)):
        with safe_open(str(file), framework="pt") as f:
            names = [n for n in f.keys() if n.endswith(("proj.weight", "lora_A.weight"))]  # noqa: SIM118
            if names:
                return f.get_tensor(names[0]).dtype
    return torch.float32


def _ratio(leak_sq: float, update_sq: float) -> float:
    return math.sqrt(leak_sq / update_sq) if update_sq else 0.0


@torch.no_grad()
def verify(subspace: Subspace, base: str | Path, adapter: str | Path | None = None, model: str | Path | None = None) -> Verification:
    """Measure the saved update of a fine-tune against `subspace` (one of `adapter`, `model`)."""
    if (adapter is None) == (model is None):
        raise SubspaceError("pass exactly one of --adapter (a saved LoRA adapter) or --model (a full fine-tune)")
    aligned = _load(base)
    initial = {name: p.detach().clone() for name, p in aligned.state_dict().items()}
    if adapter is not None:
        from peft import PeftModel

        trained_model = PeftModel.from_pretrained(aligned, str(adapter)).merge_and_unload()
        saved_dtype = _stored_dtype(Path(adapter), "adapter_model*.safetensors")
    else:
        del aligned
        trained_model = _load(model)
        saved_dtype = _stored_dtype(Path(model), "*.safetensors")
    trained = trained_model.state_dict()
    protected = {f"{name}.weight" for name in subspace.module_names}
    missing = sorted(protected - trained.keys())
    if missing:
        raise SubspaceError(
            f"{subspace.path} protects modules the model does not have (e.g. {missing[0]!r}): it was "
            "computed for another model"
        )
    prefix = decoder_prefix(trained)
    changed_decoder = protected_changed = 0
    unprotected = []
    for name, value in trained.items():
        before = initial.get(name)
        if before is None or not name.startswith(prefix) or torch.equal(before, value):
            continue
        changed_decoder += value.numel()
        if name in protected:
            protected_changed += value.numel()
        else:
            unprotected.append(name)
    modules = {}
    update_sq = input_sq = output_sq = full_weight_sq = 0.0
    for name in subspace.module_names:
        if model is not None:
            full_weight_sq += trained[f"{name}.weight"].double().square().sum().item()
        delta = trained[f"{name}.weight"].double() - initial[f"{name}.weight"].double()
        d_sq = delta.square().sum().item()
        i_sq = o_sq = 0.0
        if name in subspace.input_bases:
            i_sq = (delta @ subspace.input_bases[name].double()).square().sum().item()
        if name in subspace.output_bases:
            o_sq = (subspace.output_bases[name].double().T @ delta).square().sum().item()
        update_sq, input_sq, output_sq = update_sq + d_sq, input_sq + i_sq, output_sq + o_sq
        modules[name] = ModuleLeakage(math.sqrt(d_sq), _ratio(i_sq, d_sq), _ratio(o_sq, d_sq))
    return Verification(
        modules, update_sq, input_sq, output_sq, changed_decoder, protected_changed, saved_dtype,
        sorted(unprotected, key=lambda n: -trained[n].numel()), full_weight_sq,
    )
