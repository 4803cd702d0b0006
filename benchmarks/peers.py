"""Defences CWAC is compared with, as the benchmark runs them (not part of the plugin).

SafeLoRA (Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large
Language Models"; reference code IBM/SafeLoRA, Apache-2.0, `model.py` at d81fda1): after fine-tuning,
each LoRA module's B is replaced by C B, with C = V V^T / ||V||_F and V = W_aligned - W_base of that
module, in the modules whose update changes most under it: the `num_proj_layers` (default 10) with the
lowest cosine similarity between C B A and B A (the reference's default `select_layers_type="number"`;
`threshold` mode projects every module at or below a cosine instead). As in the reference, C is V V^T
divided by ||V||_F, not by its square (so not idempotent), A is left alone and the LoRA scaling plays no
part in the cosine. Deviations, none of which changes the result: base and aligned weights are paired by
module name instead of by parameter order; C B is computed as V (V^T B) / ||V||_F without forming the
d_out x d_out matrix C; everything in float32.

AsFT (Yang et al. 2025, "AsFT: Anchoring Safety During LLM Fine-Tuning Within Narrow Safety Basin";
reference code PKU-YuanGroup/AsFT at 07b606e, Llama 2 Community License, read and not copied;
`utils/AsFT_train_utils.py`): the task loss plus lambda * sum over LoRA modules of ||(I - C) B A||_F^2,
with SafeLoRA's C (built by a copy of SafeLoRA's `get_aligned_matrix` in `AsFT_finetuning.py`), lambda 1
(its `AsFT_reg1` scripts). As in the reference, B A carries no LoRA scaling and C is not a projection: its
eigenvalue along each singular direction of V is that direction's singular value squared over ||V||_F, so
where the alignment moved a module little the term is close to plain weight decay on B A, and where it moved
a module much (an eigenvalue above 2) the term penalises updates along the alignment's directions more than
weight decay would. On the benchmark's seed-1 aligned model the largest eigenvalue of C per module has a
median of 0.38 and a maximum of 2.8 (210 modules). Deviations: the term is computed as the sum of
(M^T M) * (A A^T), M = B - C B (r x r products, the same number) instead of forming the d_out x d_out C and
B A; a module the alignment left alone (V = 0, where the reference's C is NaN) gets C = 0; modules paired by
name.

Lisa (Huang et al. 2024, "Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning
Attack"; reference code git-disl/Lisa at 68e3659, `trainer.py` LisaTrainer, Apache-2.0): training
alternates between states: `alignment_steps` steps on alignment data, then `finetune_steps` on the user's
(the alignment steps take the place of user batches, so the step count is the same), each state's loss plus
rho/2 ||w - w_other||^2 towards the other state's last iterate once 10% of the steps are done; rho 1.
Deviations: the reference's cycle is 100 alignment + 900 fine-tuning steps out of ~20 000; the benchmark's
attack has 30 steps, so the cycle is 1 + 9 (the same 10% share of alignment steps, 3 cycles), and the
proximal term, on after 10% of the steps as there, starts inside the first cycle (step 4) where the
reference's starts after two whole cycles. Its alignment data are the reference's kind (BeaverTails_safe:
harmful prompts with safe answers): the benchmark's alignment refusals, without the benign answers that its
alignment also had. 10% of the steps is of `max_steps` (the reference: of dataloader length x epochs, the
same number there).

The hyperparameters are the references' values, not their effect, on the benchmark's adapter (r 16, alpha
32 on all 210 linear modules of SmolLM2-135M): SafeLoRA's 10 modules are 5% of them; AsFT's reference adapter
is r 8, alpha 32 on q and v only, so its lambda 1 on the unscaled B A weighs the applied update (scale 2 here,
4 there) differently, summed over 3.3 times as many modules. Not tuned here: each peer runs as its
reference's scripts configure it, as CWAC runs with its defaults.

SafeTune (a pip library with Lisa, AsFT and SafeLoRA among others) was read, not used: it needs Python 3.12
and its licence (Lexsi Labs Source Available) forbids commercial use, where this project is Apache-2.0; a
reading found it departing from the references (Lisa's proximal start and defaults, AsFT's V taken from the
model being trained, SafeLoRA's threshold mode by default).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator

import torch
from torch import nn


def _lora_modules(peft_model: nn.Module) -> dict[str, nn.Module]:
    base = peft_model.get_base_model()
    return {name: m for name, m in base.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@torch.no_grad()
def alignment_directions(peft_model: nn.Module, base_model: nn.Module, aligned_model: nn.Module) -> dict[str, torch.Tensor]:
    """V = W_aligned - W_base of each LoRA module of `peft_model`, in float32 beside its adapter."""
    base, aligned = dict(base_model.named_modules()), dict(aligned_model.named_modules())
    return {
        name: (aligned[name].weight.float() - base[name].weight.float()).to(module.lora_B["default"].weight.device)
        for name, module in _lora_modules(peft_model).items()
    }


def c_times(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """C x for SafeLoRA's C = V V^T / ||V||_F, without forming C; 0 where V = 0."""
    norm = torch.linalg.norm(v)
    return torch.zeros_like(x) if norm == 0 else v @ (v.T @ x) / norm


@torch.no_grad()
def safelora_project(
    peft_model: nn.Module,
    base_model: nn.Module,
    aligned_model: nn.Module,
    num_proj_layers: int | None = None,
    threshold: float | None = None,
) -> dict:
    """Project the fine-tuned adapter in place; returns each module's cosine and which were projected.
    With neither `num_proj_layers` nor `threshold`, the reference's default: the 10 least similar modules."""
    if num_proj_layers is not None and threshold is not None:
        raise ValueError("pass num_proj_layers (the reference's default mode) or threshold, not both")
    if threshold is None:
        num_proj_layers = 10 if num_proj_layers is None else num_proj_layers
        if num_proj_layers < 1:
            raise ValueError("num_proj_layers must be at least 1")
    directions = alignment_directions(peft_model, base_model, aligned_model)
    projected_b, cosines = {}, {}
    for name, module in _lora_modules(peft_model).items():
        v = directions[name]
        a = module.lora_A["default"].weight.float()
        b = module.lora_B["default"].weight.float()
        if not v.any():  # alignment left it alone: C = 0/0 (NaN in the reference); nothing to project onto
            cosines[name] = 1.0
            continue
        cb = c_times(v, b)
        update, changed = b @ a, cb @ a
        cosines[name] = round(torch.nn.functional.cosine_similarity(changed.reshape(1, -1), update.reshape(1, -1)).item(), 5)
        projected_b[name] = cb
    if threshold is None:
        threshold = sorted(cosines.values())[: num_proj_layers][-1]
    chosen = [name for name, cos in cosines.items() if cos <= threshold and name in projected_b]
    modules = _lora_modules(peft_model)
    for name in chosen:
        weight = modules[name].lora_B["default"].weight
        weight.copy_(projected_b[name].to(weight.dtype))
    return {"threshold": threshold, "cosines": cosines, "projected": chosen}


def mixed_with_safety(mix: list, safety: list, share: float, rng) -> list:
    """Safety-data mixing (the practitioners' baseline; SafeInstr): refusal examples make up `share` of
    the fine-tuning data, added to it, shuffled in."""
    added = rng.sample(safety, min(len(safety), round(share * len(mix) / (1 - share))))
    mixed = mix + added
    rng.shuffle(mixed)
    return mixed


def wrap_compute_loss(trainer, wrapper) -> None:
    """Put `wrapper(original, model, inputs, **kwargs)` in place of the trainer's bound `compute_loss`, as
    `cwac_plugin.hf.install` does, so that a peer composes with the Trainer the other methods use."""
    trainer.compute_loss = functools.partial(wrapper, trainer.compute_loss)


def plus(result, term, return_outputs: bool):
    """compute_loss's result (the loss, or the loss and the outputs) with `term` added to the loss."""
    return (result[0] + term, *result[1:]) if return_outputs else result + term


def asft_penalty(modules: dict[str, nn.Module], directions: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """lambda * sum ||(I - C) B A||_F^2 over the LoRA modules (`_lora_modules`)."""
    total = 0.0
    for name, module in modules.items():
        a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
        m = b - c_times(directions[name], b)
        total = total + ((m.T @ m) * (a @ a.T)).sum()
    return lam * total


def one_micro_batch_per_step(trainer, peer: str) -> None:
    """The peers add their terms to each micro-batch's loss undivided, as their references do with no
    gradient accumulation: with accumulation they would weigh more than the task loss."""
    if trainer.args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"{peer} here assumes gradient_accumulation_steps 1, got {trainer.args.gradient_accumulation_steps}: "
            "set gradient_accumulation_steps=1 in the TrainingArguments"
        )


def install_asft(trainer, base_model: nn.Module, aligned_model: nn.Module, lam: float = 1.0) -> None:
    one_micro_batch_per_step(trainer, "AsFT")
    directions = alignment_directions(trainer.model, base_model, aligned_model)
    modules = _lora_modules(trainer.model)  # found once, on the model before any wrapper the Trainer adds

    def compute_loss(original, model, inputs, return_outputs=False, **kwargs):
        result = original(model, inputs, return_outputs=return_outputs, **kwargs)
        return plus(result, asft_penalty(modules, directions, lam), return_outputs) if model.training else result

    wrap_compute_loss(trainer, compute_loss)


class Lisa:
    """The reference's LisaTrainer state machine (`check_mode`, `switch_model` and the proximal term of its
    `training_step`), apart from the Trainer so that it can be checked step by step."""

    def __init__(self, params: dict[str, nn.Parameter], alignment_batches: Iterator, total_steps: int,
                 alignment_steps: int = 1, finetune_steps: int = 9, rho: float = 1.0):
        self.params = params
        self.last = {state: {n: p.detach().clone() for n, p in params.items()} for state in ("alignment", "finetune")}
        self.alignment_batches = alignment_batches
        self.alignment_steps, self.finetune_steps, self.rho = alignment_steps, finetune_steps, rho
        self.proximal_after = 0.1 * total_steps  # "don't do proximal in the initial 10% of steps"
        self.status = "alignment" if alignment_steps else "finetune"
        self.clock = self.steps = 0

    def inputs(self, user_inputs):
        """The batch this step trains on: the user's, or in alignment an alignment batch in its place."""
        if self.status == "alignment":
            if self.clock % self.alignment_steps == 0 and self.steps and self.finetune_steps:
                self._switch("finetune")
                return user_inputs
            return next(self.alignment_batches)
        if self.clock % self.finetune_steps == 0 and self.steps and self.alignment_steps:
            self._switch("alignment")
            return next(self.alignment_batches)
        return user_inputs

    def _switch(self, status: str) -> None:
        self.last[self.status] = {n: p.detach().clone() for n, p in self.params.items()}
        self.status, self.clock = status, 0

    def proximal(self) -> torch.Tensor | float:
        if self.steps <= self.proximal_after or not self.rho:
            return 0.0
        other = self.last["finetune" if self.status == "alignment" else "alignment"]
        return self.rho / 2 * sum(torch.sum((p - other[n]) ** 2) for n, p in self.params.items())

    def stepped(self) -> None:
        self.steps += 1
        self.clock += 1


def alignment_batches(examples: list, batch_size: int, collate, device, seed: int) -> Iterator:
    """Batches of `examples` without end, reshuffled each pass (the reference's RandomSampler loader)."""
    if len(examples) < batch_size:
        raise ValueError(f"{len(examples)} alignment examples do not fill one batch of {batch_size}")
    rng = random.Random(seed)
    while True:
        order = rng.sample(examples, len(examples))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield {k: v.to(device) for k, v in collate(order[start : start + batch_size]).items()}


def install_lisa(trainer, alignment: list, seed: int, **settings) -> Lisa:
    one_micro_batch_per_step(trainer, "Lisa")
    if trainer.args.max_steps <= 0:  # the 10% that switches the proximal term on is of max_steps
        raise ValueError("Lisa here needs max_steps: set max_steps in the TrainingArguments")
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    batches = alignment_batches(alignment, trainer.args.per_device_train_batch_size, trainer.data_collator, trainer.args.device, seed)
    lisa = Lisa(params, batches, trainer.args.max_steps, **settings)

    def compute_loss(original, model, inputs, return_outputs=False, **kwargs):
        if not model.training:
            return original(model, inputs, return_outputs=return_outputs, **kwargs)
        inputs = lisa.inputs(inputs)
        # an alignment batch is not the batch the Trainer counted tokens for: its own mean loss (one device,
        # no accumulation here, where the two are the same)
        kwargs["num_items_in_batch"] = None
        result = original(model, inputs, return_outputs=return_outputs, **kwargs)
        proximal = lisa.proximal()
        lisa.stepped()
        return plus(result, proximal, return_outputs)

    wrap_compute_loss(trainer, compute_loss)
    return lisa
