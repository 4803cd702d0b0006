"""Test-only Axolotl plugin that wraps the same trainer methods CWAC wraps (`compute_loss`, `log`).

Axolotl integrations such as llm_compressor wrap `compute_loss` on the trainer instance too; the
e2e test lists both plugins and checks that both wrappers take effect.
"""

import functools

from axolotl.integrations.base import BasePlugin


class LossWrappingPlugin(BasePlugin):
    def post_trainer_create(self, cfg, trainer):
        calls = {"compute_loss": 0}
        original_compute_loss = trainer.compute_loss
        original_log = trainer.log

        @functools.wraps(original_compute_loss)
        def compute_loss(*args, **kwargs):
            calls["compute_loss"] += 1
            return original_compute_loss(*args, **kwargs)

        @functools.wraps(original_log)
        def log(logs, *args, **kwargs):
            if "loss" in logs:
                logs = {**logs, "other_plugin/compute_loss_calls": calls["compute_loss"]}
            return original_log(logs, *args, **kwargs)

        trainer.compute_loss = compute_loss
        trainer.log = log
