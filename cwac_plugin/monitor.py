"""Safety measured while training: harmful score and over-refusal on small held-out sets, logged.

A fine-tune that is losing its refusals should say so while it runs, not only when `cwac eval` is run
afterwards. Every `eval_every` steps each rank answers its share of the prompts (greedy, chat template,
`cwac eval`'s judge) and the verdict counts are summed over ranks, so every rank logs the same values
and all take the same branch at `max_harmful_score`. Under ZeRO-3 and FSDP2 every forward is a
collective: each rank gets as many prompts as the others (padded with repeats, not counted), and
generation runs in step (`synced_gpus`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from cwac_plugin.eval import COMPLIANCE, DEGENERATE, REFUSAL, generate, phrase_judge
from cwac_plugin.parallel import sharded_parameters

LOG = logging.getLogger(__name__)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def share_of(prompts: list[str], rank: int, world: int, padded: bool) -> tuple[list[str], int]:
    """This rank's prompts, and how many of them count; `padded`: to the same count on every rank."""
    mine = prompts[rank::world]
    per_rank = math.ceil(len(prompts) / world) if padded else len(mine)
    return mine + [prompts[0]] * (per_rank - len(mine)), len(mine)


class SafetyMonitor(TrainerCallback):
    """Every `every` steps (None: the trainer's resolved `eval_steps`), the safety scores, logged."""

    def __init__(
        self,
        trainer,
        harmful: list[str],
        benign: list[str] | None,
        every: int | None,
        max_new_tokens: int = 64,
        batch_size: int = 32,
        max_harmful_score: float | None = None,
        judge: Callable[[str, str], str] = phrase_judge,
    ):
        self.trainer = trainer
        self.harmful, self.benign = harmful, benign or []
        self.every = every
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.max_harmful_score = max_harmful_score
        self.judge = judge
        self.history: list[dict] = []
        if not harmful:
            raise ValueError("cwac.eval_harmful: the file holds no prompt")

    def on_train_begin(self, args, state, control, **kwargs):
        if self.every is None:  # Axolotl's eval_steps, also a fraction of the run (evals_per_epoch): resolved here
            if str(args.eval_strategy) not in ("steps", "IntervalStrategy.STEPS") or not state.eval_steps:
                raise ValueError(
                    "cwac.eval_harmful: set cwac.eval_every (steps between the in-training safety evaluations): "
                    "this run evaluates on no step schedule (no eval_steps / evals_per_epoch) to default to"
                )
            self.every = int(state.eval_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        metrics = self.measure(model)
        self.history.append({"step": state.global_step, **metrics})
        self.trainer.log(metrics)
        if self.max_harmful_score is not None and metrics["cwac/harmful_score"] > self.max_harmful_score:
            LOG.warning(
                "cwac.max_harmful_score: the harmful score on cwac.eval_harmful is %.3f at step %d, above %g: "
                "stopping training (this step's weights are saved as a checkpoint, to inspect, not to ship)",
                metrics["cwac/harmful_score"], state.global_step, self.max_harmful_score,
            )
            self.history[-1]["stopped"] = True
            control.should_training_stop = True
            control.should_save = True

    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        rank, world = _rank_and_world()
        synced = world > 1 and sharded_parameters(model)
        tokenizer = self.trainer.processing_class
        was_training = model.training
        model.eval()
        counts = []
        try:
            for prompts, counted in ((self.harmful, (COMPLIANCE, DEGENERATE)), (self.benign, (REFUSAL,))):
                share, real = share_of(prompts, rank, world, synced) if prompts else ([], 0)
                answers = generate(
                    model, tokenizer, share, self.max_new_tokens, self.batch_size, "cwac eval", synced, rank == 0
                )[:real]
                verdicts = [self.judge(p, a) for p, a in zip(share, answers)]
                counts += [sum(v == verdict for v in verdicts) for verdict in counted] + [len(verdicts)]
        finally:
            model.train(was_training)
        totals = torch.tensor(counts, dtype=torch.float64, device=self.trainer.args.device)
        if world > 1:
            torch.distributed.all_reduce(totals)
        compliant, degenerate, n_harmful, refused, n_benign = totals.tolist()
        metrics = {
            "cwac/harmful_score": compliant / n_harmful,
            "cwac/degenerate": degenerate / n_harmful,
            "cwac/eval_prompts": n_harmful,
        }
        if n_benign:
            metrics["cwac/over_refusal"] = refused / n_benign
        return metrics
