"""`cwac` command line (also `axolotl cwac ...` through the axolotl.cli_commands entry point).

Every command reads the same Axolotl YAML as training, so the model, tokenizer, quantisation
and `cwac` block are exactly the ones `axolotl train` will use.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

LOG = logging.getLogger("cwac_plugin")


PLUGIN_NAME = "cwac_plugin.CWACPlugin"


def load_axolotl_config(config: Path):
    """Axolotl's own loader: registers plugins before validation, so the `cwac` block survives.

    The CWAC plugin itself is then unregistered: its training hooks would demand the artifacts
    these commands are about to create. Other plugins stay, so the model loads as in training.
    """
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    cfg = load_cfg(str(config))
    if PLUGIN_NAME not in (cfg.plugins or []):
        raise click.UsageError(f"{config}: add `{PLUGIN_NAME}` to `plugins:` so the cwac block is validated")
    PluginManager.get_instance().plugins.pop(PLUGIN_NAME, None)
    return cfg


@click.group()
def cwac():
    """CWAC: keep a model's safety alignment through fine-tuning."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cwac.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of cwac.subspace.")
def subspace(config: Path, output: Path | None):
    """Compute the safety subspace of the aligned model in CONFIG and write cwac.subspace."""
    from axolotl.cli.utils.load import load_model_and_tokenizer

    from cwac_plugin.plugin import settings_from
    from cwac_plugin.subspace import SubspaceData, compute_subspace, describe

    cfg = load_axolotl_config(config)
    settings = settings_from(cfg)
    target = output or settings.subspace
    if target is None:
        raise click.UsageError(f"{config}: set cwac.subspace (the file to write) or pass --output")
    data = SubspaceData.load(settings)  # data errors surface before the model is loaded
    model, tokenizer, _ = load_model_and_tokenizer(cfg=cfg, inference=True)
    result = compute_subspace(model, tokenizer, settings, settings.max_length or cfg.sequence_len, data)
    path = result.save(target)
    click.echo(f"wrote {path}: {describe(result)}")


def main():
    try:
        cwac(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except ValueError as err:  # config, data and subspace errors carry their own fix
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
