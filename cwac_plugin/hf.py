"""Driving the constraints from a Hugging Face `Trainer` (and so TRL, LLaMA-Factory, Axolotl).

    constraint = WeightConstraint(trainer.model, Subspace.load(path))   # before trainer.train()
    install(trainer, constraint)

`install` adds a `TrainerCallback` and wraps the trainer's bound `log`, the same way Axolotl's
llm_compressor integration wraps `compute_loss`: it composes with any trainer class and any
other plugin, where a custom trainer class would not.
"""

from __future__ import annotations

import functools
import logging

from transformers import Trainer, TrainerCallback

from cwac_plugin.projection import WeightConstraint

LOG = logging.getLogger(__name__)


class CWACCallback(TrainerCallback):
    """Attaches the weight constraint for the run and, in update mode, enforces it each step.

    `on_optimizer_step` runs after the real step also under DeepSpeed, where accelerate performs
    the step inside `backward` and the Trainer's own `optimizer.step()` is a no-op.
    """

    def __init__(self, constraint: WeightConstraint):
        self.constraint = constraint

    def on_train_begin(self, args, state, control, **kwargs):
        self.constraint.attach()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.constraint.mode == "update":
            self.constraint.enforce()

    def on_train_end(self, args, state, control, **kwargs):
        self.constraint.detach()


def leakage_metrics(constraint: WeightConstraint) -> dict[str, float]:
    report = constraint.leakage()
    metrics = {"cwac/leakage": report.input_leakage}
    if any(tensor.output_basis is not None for tensor in constraint.tensors):
        metrics["cwac/output_leakage"] = report.output_leakage
    return metrics


def install(trainer: Trainer, constraint: WeightConstraint, log_leakage: bool = True) -> CWACCallback:
    """Add the callback and, if asked, merge leakage metrics into every training log."""
    callback = CWACCallback(constraint)
    trainer.add_callback(callback)
    if log_leakage:
        original_log = trainer.log

        @functools.wraps(original_log)
        def log(logs: dict[str, float], *args, **kwargs):
            # Training-step logs only: every rank calls log() for them, which the collective
            # reads of ZeRO-partitioned weights inside leakage() require.
            if "loss" in logs:
                logs = {**logs, **leakage_metrics(constraint)}
            return original_log(logs, *args, **kwargs)

        trainer.log = log
    return callback
