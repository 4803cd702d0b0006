"""The Axolotl plugin: a thin adapter from Axolotl's hooks to the framework-free core."""

from __future__ import annotations

import logging

from axolotl.integrations.base import BasePlugin

from cwac_plugin.config import CWACConfig
from cwac_plugin.hf import install
from cwac_plugin.projection import WeightConstraint
from cwac_plugin.subspace import Subspace, check_model_matches

LOG = logging.getLogger(__name__)


def settings_from(cfg) -> CWACConfig:
    """The validated `cwac` block; listing the plugin without one is a configuration error."""
    block = cfg.get("cwac") if hasattr(cfg, "get") else None
    if block is None:
        raise ValueError(
            "plugins lists cwac_plugin.CWACPlugin but the config has no `cwac:` block; add one "
            "(at least cwac.subspace), or remove the plugin"
        )
    return block if isinstance(block, CWACConfig) else CWACConfig.model_validate(dict(block))


class CWACPlugin(BasePlugin):
    """Keeps fine-tuning updates out of a precomputed safety subspace."""

    def __init__(self):
        super().__init__()
        self.subspace: Subspace | None = None
        self.constraint: WeightConstraint | None = None

    def get_input_args(self) -> str:
        return "cwac_plugin.config.CWACArgs"

    def pre_model_load(self, cfg):
        """Fail on a missing or malformed subspace file before the model is loaded."""
        settings = settings_from(cfg)
        if settings.weight_constraint:
            self.subspace = Subspace.load(settings.subspace)

    def post_trainer_create(self, cfg, trainer):
        """Bind the subspace to the trainable tensors while they still hold the initial weights."""
        settings = settings_from(cfg)
        if not settings.weight_constraint:
            LOG.warning("cwac.weight_constraint is false: weight updates are not constrained")
            return
        check_model_matches(self.subspace, trainer.model)
        self.constraint = WeightConstraint(trainer.model, self.subspace, settings.projection, settings.log_leakage)
        install(trainer, self.constraint, settings.log_leakage)
        LOG.info(
            "CWAC weight constraint (%s mode) on %d modules from %s%s",
            settings.projection,
            len(self.constraint.module_names),
            self.subspace.path,
            f"; {len(self.constraint.frozen_modules)} protected modules are frozen" if self.constraint.frozen_modules else "",
        )

    def post_train(self, cfg, model):
        if self.constraint is not None:
            self.constraint.detach()
