"""Driving the constraints from a Hugging Face `Trainer` (and so TRL, LLaMA-Factory, Axolotl).

    weight = WeightConstraint(trainer.model, Subspace.load(path))      # before trainer.train()
    install(trainer, weight=weight, activation=None)

`install` adds a `TrainerCallback` and wraps the trainer's bound `compute_loss` and `log`, the
way Axolotl's llm_compressor integration wraps `compute_loss`: it composes with any trainer
class and any other plugin, where a custom trainer class would not.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch
from pydantic import BaseModel
from transformers import Trainer, TrainerCallback

from cwac_plugin.data import write_json_atomically
from cwac_plugin.monitor import SafetyMonitor
from cwac_plugin.projection import WeightConstraint
from cwac_plugin.sae import ActivationConstraint

LOG = logging.getLogger(__name__)
REPORT_NAME = "cwac_report.json"


class CWACCallback(TrainerCallback):
    """Attaches the weight constraint for the run and, in update mode, enforces it each step.

    `on_optimizer_step` runs after the real step also under DeepSpeed, where accelerate performs
    the step inside `backward` and the Trainer's own `optimizer.step()` is a no-op.
    """

    def __init__(
        self,
        weight: WeightConstraint | None,
        activation: ActivationConstraint | None,
        settings: BaseModel | None = None,
        monitor: SafetyMonitor | None = None,
    ):
        self.weight = weight
        self.activation = activation
        self.settings = settings
        self.monitor = monitor
        self.last_logged: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # After `accelerator.prepare` and a resume's checkpoint load: the constraints were built
        # from the initial weights, and must still be bound to the tensors the optimizer steps.
        if self.weight is not None:
            self.weight.follow_sharding()
            self.weight.check_bound(model, optimizer)
            self.weight.attach()
        if self.activation is not None:
            self.activation.check_resume(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.weight is not None:
            self.weight.project_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.weight is not None and self.weight.mode == "update":
            self.weight.enforce()

    def on_train_end(self, args, state, control, **kwargs):
        if self.weight is not None:
            self.weight.detach()
        if self.activation is not None:
            self.activation.remove()
        report = self.report(state.global_step)  # every rank: a collective read under ZeRO-3
        if state.is_world_process_zero:
            write_json_atomically(Path(args.output_dir) / REPORT_NAME, report)

    def report(self, global_step: int) -> dict:
        """What the saved model carries as its own evidence; `cwac verify` checks it independently."""
        report: dict = {
            "format": "cwac-report/1",
            "global_step": global_step,
            "settings": self.settings.model_dump() if self.settings is not None else None,
            "last_logged": self.last_logged,
        }
        if self.monitor is not None:
            report["safety_during_training"] = self.monitor.history
        if self.weight is not None:
            leakage = self.weight.leakage()
            subspace = Path(self.weight.subspace_path)
            report["weight_constraint"] = {
                "subspace": str(subspace),
                "subspace_sha256": hashlib.sha256(subspace.read_bytes()).hexdigest() if subspace.is_file() else None,
                "mode": self.weight.mode,
                "fsdp2_sharded": self.weight.sharded,
                "modules": len(self.weight.module_names),
                "coverage": self.weight.coverage.share,
                "coverage_detail": self.weight.coverage.describe(),
                "unprotected": self.weight.coverage.unprotected,
                "precision_mismatch": self.weight.precision_mismatch,
                "final_leakage": leakage.input_leakage,
                "final_output_leakage": leakage.output_leakage,
            }
        return report


def aux_loss_scale(trainer: Trainer, num_items_in_batch) -> float:
    """What to multiply a per-micro-batch mean loss by, inside `compute_loss`, so that it is
    averaged over gradient accumulation exactly like the main loss.

    The Trainer divides compute_loss's result by the accumulation steps unless the model
    normalises by `num_items_in_batch` itself (or a `compute_loss_func` does); in that case the
    main loss is already a share of the accumulated batch and ours must be divided here.
    """
    divided_later = (
        not trainer.model_accepts_loss_kwargs or num_items_in_batch is None
    ) and trainer.compute_loss_func is None
    steps = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
    return 1.0 if divided_later else 1.0 / steps


class _ActivationMetrics:
    """Running sums between two logs; averaged over ranks when logged.

    The sums stay on the loss's device: reading each micro-batch's loss on the host would make the
    CPU wait for the GPU between the forward and the backward of every micro-batch.
    """

    def __init__(self):
        self.sums: torch.Tensor | None = None  # act_loss, drift, micro-batches

    def add(self, act_loss: torch.Tensor, drift: torch.Tensor) -> None:
        one = torch.ones((), device=act_loss.device)
        step = torch.stack([act_loss.detach().float(), drift.detach().float(), one])
        self.sums = step if self.sums is None else self.sums + step

    def pop(self, device: torch.device) -> dict[str, float]:
        sums = torch.zeros(3, device=device) if self.sums is None else self.sums.to(device)
        self.sums = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        act_loss, drift, count = sums.tolist()
        return {"cwac/act_loss": act_loss / max(count, 1.0), "cwac/feature_drift": drift / max(count, 1.0)}


def leakage_metrics(constraint: WeightConstraint) -> dict[str, float]:
    report = constraint.leakage()
    metrics = {"cwac/leakage": report.input_leakage}
    if any(tensor.output_basis is not None for tensor in constraint.tensors):
        metrics["cwac/output_leakage"] = report.output_leakage
    return metrics


def install(
    trainer: Trainer,
    weight: WeightConstraint | None = None,
    activation: ActivationConstraint | None = None,
    log_leakage: bool = True,
    settings: BaseModel | None = None,
    monitor: SafetyMonitor | None = None,
) -> CWACCallback:
    """Add the callback, the activation penalty to `compute_loss`, and cwac/* metrics to `log`.

    The callback writes `cwac_report.json` into the output directory when training ends, with
    `settings` (the `cwac` block) in it when given, and the in-training safety scores of `monitor`."""
    callback = CWACCallback(weight, activation, settings, monitor)
    trainer.add_callback(callback)
    if monitor is not None:
        trainer.add_callback(monitor)
    metrics = _ActivationMetrics()

    if activation is not None:
        original_compute_loss = trainer.compute_loss

        @functools.wraps(original_compute_loss)
        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            with activation.watching_training_forward() as training_hidden:
                result = original_compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
                )
            if not model.training:
                return result
            act_loss, drift = activation.loss(model, inputs, training_hidden)
            metrics.add(act_loss, drift)
            scaled = act_loss * aux_loss_scale(trainer, num_items_in_batch)
            if return_outputs:
                return result[0] + scaled, result[1]
            return result + scaled

        trainer.compute_loss = compute_loss

    if (weight is not None and log_leakage) or activation is not None:
        original_log = trainer.log

        @functools.wraps(original_log)
        def log(logs: dict[str, float], *args, **kwargs):
            # Training-step logs only: every rank calls log() for them, which the collective reads
            # of ZeRO-partitioned weights and the metric all-reduce require.
            if "loss" in logs:
                extra = {}
                if weight is not None and log_leakage:
                    extra |= leakage_metrics(weight)
                if activation is not None:
                    extra |= metrics.pop(trainer.args.device)
                    # The Trainer logs what compute_loss returned, task loss plus penalty, averaged like
                    # cwac/act_loss over the same micro-batches: `loss` (and Axolotl's `ppl` from it)
                    # stay the task loss, comparable with a run without the plugin.
                    extra["cwac/total_loss"] = logs["loss"]
                    logs = {**logs, "loss": logs["loss"] - extra["cwac/act_loss"]}
                callback.last_logged = extra
                logs = {**logs, **extra}
            return original_log(logs, *args, **kwargs)

        trainer.log = log
    return callback
