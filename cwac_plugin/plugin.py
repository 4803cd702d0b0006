"""The Axolotl plugin: a thin adapter from Axolotl's hooks to the framework-free core."""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from cwac_plugin.config import CWACConfig
from cwac_plugin.data import Batches, Example
from cwac_plugin.eval import load_prompts
from cwac_plugin.guards import refuse_unsupported
from cwac_plugin.hf import install
from cwac_plugin.monitor import SafetyMonitor
from cwac_plugin.prepare import check_prepared
from cwac_plugin.projection import WeightConstraint
from cwac_plugin.sae import ActivationConstraint, FeatureSet, SAEConfigError, load_anchor_examples, load_sae
from cwac_plugin.subspace import Subspace, check_model_matches, check_settings_match

# Under the `axolotl` logger tree: Axolotl shows only WARNING and above from other loggers.
LOG = get_logger("axolotl.integrations.cwac")


def settings_from(cfg) -> CWACConfig:
    """The validated `cwac` block, its data resolved (`own_data.with_own_data`); listing the plugin
    without one is a configuration error."""
    block = cfg.get("cwac") if hasattr(cfg, "get") else None
    if block is None:
        raise ValueError(
            "plugins lists cwac_plugin.CWACPlugin but the config has no `cwac:` block; add one "
            "(`cwac: {}` takes every default), or remove the plugin"
        )
    from cwac_plugin.own_data import with_own_data

    return with_own_data(block if isinstance(block, CWACConfig) else CWACConfig.model_validate(dict(block)))


class CWACPlugin(BasePlugin):
    """Keeps fine-tuning updates out of a safety subspace and safety-critical SAE features in place."""

    def __init__(self):
        super().__init__()
        self.subspace: Subspace | None = None
        self.features: FeatureSet | None = None
        self.sae = None
        self.anchor_examples: list[Example] | None = None
        self.weight: WeightConstraint | None = None
        self.activation: ActivationConstraint | None = None
        self.eval_prompts: list[list[str] | None] | None = None

    def get_input_args(self) -> str:
        return "cwac_plugin.config.CWACArgs"

    def pre_model_load(self, cfg):
        """Read every artifact now: a missing or malformed file fails before the model is loaded."""
        settings = settings_from(cfg)
        refuse_unsupported(cfg)
        check_prepared(cfg, settings)
        if settings.weight_constraint:
            self.subspace = Subspace.load(settings.subspace)
            check_settings_match(self.subspace, settings)
        if settings.activation_constraint:
            self.features = FeatureSet.load(settings.features)
            if settings.hook_point and settings.hook_point != self.features.hook_point:
                raise SAEConfigError(
                    f"cwac.hook_point is {settings.hook_point} but {settings.features} was selected at "
                    f"{self.features.hook_point}; rerun `cwac features` or fix cwac.hook_point"
                )
            self.sae = load_sae(settings)
            self.features.check_against(self.sae)
            if settings.act_anchor == "safety":
                self.anchor_examples = load_anchor_examples(settings)
        if settings.eval_harmful:
            if not (settings.eval_every or cfg.get("eval_steps") or cfg.get("evals_per_epoch")):
                raise ValueError(
                    "cwac.eval_harmful: set cwac.eval_every (steps between the in-training safety evaluations), "
                    "or Axolotl's eval_steps / evals_per_epoch for it to follow"
                )
            self.eval_prompts = [
                [r["prompt"] for r in load_prompts(path, f"cwac.{key}")] if path else None
                for key, path in (("eval_harmful", settings.eval_harmful), ("eval_benign", settings.eval_benign))
            ]

    def post_trainer_create(self, cfg, trainer):
        """Bind the constraints while the trainable tensors still hold the initial weights."""
        settings = settings_from(cfg)
        if settings.weight_constraint:
            check_model_matches(self.subspace, trainer.model)
            self.weight = WeightConstraint(
                trainer.model,
                self.subspace,
                settings.projection,
                settings.log_leakage,
                allow_partial=settings.allow_partial,
                allow_precision_mismatch=settings.allow_precision_mismatch,
            )
            frozen = len(self.weight.frozen_modules)
            LOG.info(
                "CWAC weight constraint (%s mode) on %d modules from %s, covering %s%s",
                settings.projection,
                len(self.weight.module_names),
                self.subspace.path,
                self.weight.coverage.describe(),
                f"; {frozen} protected modules are frozen" if frozen else "",
            )
            if self.weight.coverage.partial:
                LOG.warning("cwac.allow_partial: %s train unconstrained", ", ".join(self.weight.coverage.unprotected[:8]))
            if self.weight.precision_mismatch:
                LOG.warning("cwac.allow_precision_mismatch: %s", self.weight.precision_mismatch)
        else:
            LOG.warning("cwac.weight_constraint is false: weight updates are not constrained")
        if settings.activation_constraint:
            anchors = None
            if self.anchor_examples is not None:
                max_length = settings.max_length or cfg.sequence_len
                anchors = Batches(
                    trainer.processing_class, self.anchor_examples, max_length, settings.anchor_batch_size, trainer.args.device
                )
            self.activation = ActivationConstraint(trainer.model, self.sae, self.features, settings, anchors)
            LOG.info(
                "CWAC activation constraint: %d SAE features at %s, lambda %g, %s anchors",
                len(self.features.indices),
                self.features.hook_point,
                settings.act_lambda,
                settings.act_anchor,
            )
        monitor = None
        if self.eval_prompts is not None:
            monitor = SafetyMonitor(
                trainer, *self.eval_prompts, settings.eval_every, settings.eval_max_new_tokens, settings.generate_batch_size,
                settings.max_harmful_score,
            )
            LOG.info(
                "CWAC safety evaluation every %s steps on %d harmful prompts",
                settings.eval_every or "eval_steps", len(self.eval_prompts[0]),
            )
        install(trainer, self.weight, self.activation, settings.log_leakage, settings, monitor)

    def post_train(self, cfg, model):
        """Axolotl calls this twice, the second time after the process group is gone: removing
        hooks is idempotent and needs no collective."""
        if self.weight is not None:
            self.weight.detach()
        if self.activation is not None:
            self.activation.remove()
