"""`cwac` command line (also `axolotl cwac ...` through the axolotl.cli_commands entry point).

Every command reads the same Axolotl YAML as training, so the model, tokenizer, quantisation
and `cwac` block are exactly the ones `axolotl train` will use.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from cwac_plugin import ranks

LOG = logging.getLogger("cwac_plugin")


PLUGIN_NAME = "cwac_plugin.CWACPlugin"


# Precompute runs plain forwards over the whole model, on one process or, under torchrun, on every
# rank over its share of the data. There the model is sharded as training shards it when the config
# asks for FSDP2 or DeepSpeed ZeRO-3 (and is not quantised: a 4-bit model fits one device), and the
# other backend's keys are dropped; otherwise all are (ZeRO-1/2 and DDP keep a whole model on every
# rank anyway). Axolotl's fused LoRA kernels (on by default on CUDA) bypass the modules whose inputs
# precompute reads.
BACKEND_KEYS = {"zero3": ("deepspeed",), "fsdp2": ("fsdp", "fsdp_config", "fsdp_version")}
PRECOMPUTE_KERNELS_OFF = {k: False for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")}


def load_axolotl_config(config: Path):
    """Axolotl's own loader: registers plugins before validation, so the `cwac` block survives.

    The CWAC plugin itself is then unregistered: its training hooks would demand the artifacts
    these commands are about to create. Other plugins stay, so the model loads as in training,
    at the same precision and quantisation, but whole and without fused kernels.
    """
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    import yaml
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.dict import DictDefault

    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    ranks.init_process_group()
    sharding = sharding_for_precompute(raw, config)
    for backend, keys in BACKEND_KEYS.items():
        if backend != sharding:
            for key in keys:
                raw.pop(key, None)
    if raw.get("adapter"):
        raw |= PRECOMPUTE_KERNELS_OFF
    cfg = load_cfg(DictDefault(raw))
    if PLUGIN_NAME not in (cfg.plugins or []):
        raise click.UsageError(f"{config}: add `{PLUGIN_NAME}` to `plugins:` so the cwac block is validated")
    PluginManager.get_instance().plugins.pop(PLUGIN_NAME, None)
    return cfg


def sharding_for_precompute(raw: dict, config: Path) -> str | None:
    """"fsdp2" or "zero3" where a torchrun job shards a model not loaded quantised; None: whole on every rank."""
    if not ranks.launched_distributed() or raw.get("load_in_4bit") or raw.get("load_in_8bit"):
        return None
    if str(raw.get("fsdp_version")) == "2":
        return "fsdp2"
    fsdp_chosen = raw.get("fsdp") or raw.get("fsdp_config")  # Axolotl takes FSDP over DeepSpeed then
    if raw.get("deepspeed") and not fsdp_chosen and _zero_stage(raw["deepspeed"], config) == 3:
        return "zero3"
    return None


def _zero_stage(deepspeed: dict | str, config: Path) -> int | None:
    """The ZeRO stage of the `deepspeed:` value, a dict or a JSON file (a relative path is read from
    where the command runs, as Axolotl reads it)."""
    if isinstance(deepspeed, str):
        try:
            deepspeed = json.loads(Path(deepspeed).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise click.UsageError(f"{config}: deepspeed: cannot read {deepspeed} ({error}); fix the path or the JSON") from error
    return (deepspeed.get("zero_optimization") or {}).get("stage")


def _say(message: str) -> None:
    """Print once per job: every rank of a torchrun job runs the command."""
    if ranks.is_main_process():
        click.echo(message)


def _job(config: Path, output: Path | None, key: str, what: str):
    """The validated config, its `cwac` block, and where to write: --output, else cwac.<key>."""
    from cwac_plugin.plugin import settings_from

    cfg = load_axolotl_config(config)
    settings = settings_from(cfg)
    target = output or getattr(settings, key)
    if target is None:
        raise click.UsageError(f"{config}: set cwac.{key} ({what}) or pass --output")
    if settings.own_data and not Path(settings.safety_data).is_file():
        raise click.UsageError(
            f"{config}: cwac.safety_data is unset, so it is built from the model's own refusals by "
            f"`cwac prepare {config}` (which also makes this artifact); or set cwac.safety_data"
        )
    return cfg, settings, target, settings.max_length or cfg.sequence_len


def _load_model(cfg, max_length: int, examples: list):
    """The model and tokenizer of CONFIG; every example is tokenised first, before the (slow) model."""
    from axolotl.cli.utils.load import load_model_and_tokenizer
    from axolotl.loaders import load_tokenizer

    from cwac_plugin.data import check_lengths

    check_lengths(load_tokenizer(cfg), examples, max_length)
    if cfg.deepspeed:  # kept by load_axolotl_config only to partition like ZeRO-3 training
        # before DeepSpeed's zero.Init: it leaves a bound method as Module.__init_subclass__, so that a
        # generic Module subclass defined after it (sae_lens's SAE) loses its type parameters
        import sae_lens  # noqa: F401
    model, tokenizer, _ = load_model_and_tokenizer(cfg=cfg, inference=True)
    if cfg.fsdp_version is not None or cfg.deepspeed:  # kept by load_axolotl_config only to shard like training
        model = ranks.shard_like_training(model, cfg.micro_batch_size)
    if ranks.world_size() > 1:
        from cwac_plugin.parallel import is_sharded

        parameters = list(model.parameters())
        sharded = sum(is_sharded(parameter) for parameter in parameters)
        backend = "DeepSpeed ZeRO-3" if cfg.deepspeed else "FSDP2"
        layout = f"{sharded} of {len(parameters)} parameters sharded with {backend} as in training" if sharded else "the whole model on every rank"
        _say(f"precompute on {ranks.world_size()} ranks, {layout}; rank r takes batches r, r + {ranks.world_size()}, ...")
    return model, tokenizer


@click.group()
def cwac():
    """CWAC: keep a model's safety alignment through fine-tuning."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _sae_examples(config: Path, settings):
    from cwac_plugin.data import load_examples

    if not settings.safety_data:
        raise click.UsageError(f"{config}: set cwac.safety_data (and ideally cwac.contrast_data) to train the SAE on")
    examples = load_examples(settings.safety_data, "cwac.safety_data", settings.max_examples)
    if settings.contrast_data:
        examples += load_examples(settings.contrast_data, "cwac.contrast_data", settings.max_examples)
    return examples


def _feature_examples(config: Path, settings):
    from cwac_plugin.data import load_examples

    if not (settings.safety_data and settings.contrast_data):
        raise click.UsageError(f"{config}: cwac.safety_data (harmful) and cwac.contrast_data (benign) are both needed")
    harmful = load_examples(settings.safety_data, "cwac.safety_data", settings.max_examples)
    benign = load_examples(settings.contrast_data, "cwac.contrast_data", settings.max_examples)
    return harmful, benign


def _make_subspace(settings, data, model, tokenizer, max_length: int, target: Path, recipe: dict) -> None:
    from cwac_plugin.subspace import compute_subspace

    result = compute_subspace(model, tokenizer, settings, max_length, data)
    if result is not None:  # None on a rank other than the first: its share is in rank 0's result
        _write_subspace(result, target, recipe)


def _write_subspace(result, target: Path, recipe: dict) -> None:
    from cwac_plugin.prepare import RECIPE_KEY
    from cwac_plugin.subspace import describe

    result.metadata[RECIPE_KEY] = json.dumps(recipe, sort_keys=True)
    path = result.save(target)
    click.echo(f"wrote {path}: {describe(result)}")


def _fit_sae(settings, activations, model, target: Path, recipe: dict) -> None:
    """Train and write the SAE on rank 0's gathered activations: no collective, so the other ranks
    of a torchrun job are free to finish meanwhile."""
    from cwac_plugin.models import base_model_of
    from cwac_plugin.sae import fit_sae

    model_name = str(base_model_of(model).config._name_or_path)
    report = fit_sae(activations, settings, model_name, next(model.parameters()).device, target, recipe=recipe)
    click.echo(
        f"wrote {target}: explained variance {report['explained_variance']:.3f}, L0 {report['l0']:.1f}, "
        f"dead features {report['dead_features']}/{report['d_sae']} (on {report['tokens']} held-out tokens)"
    )


def _with_hook_point(settings, model):
    """The block with cwac.hook_point filled in for an SAE this job trains, saying where it reads."""
    from cwac_plugin.sae import with_default_hook_point

    resolved = with_default_hook_point(settings, model)
    if not settings.hook_point:
        _say(f"cwac.hook_point is unset: the SAE trained here reads {resolved.hook_point} (90% of the model's depth)")
    return resolved


def _feature_states(settings, harmful, benign, model, tokenizer, max_length: int, sae=None):
    """The prompt activations features are selected from, at the SAE's hook point (or, for an SAE
    this job is about to train, at the hook point it will read)."""
    from cwac_plugin.sae import check_sae_fits, feature_prompt_states, hook_point_of

    hook_point = settings.hook_point if sae is None else hook_point_of(settings, sae)
    if sae is not None:
        check_sae_fits(sae, model, hook_point)
    return hook_point, feature_prompt_states(model, tokenizer, hook_point, harmful, benign, max_length)


def _select_features(settings, sae, hook_point: str, states, harmful, model, target: Path, recipe: dict, top: int):
    from cwac_plugin.models import base_model_of
    from cwac_plugin.sae import feature_table, features_from_states

    sae.to(next(model.parameters()).device)
    model_name = str(base_model_of(model).config._name_or_path)
    feature_set, z_harm, _ = features_from_states(sae, settings, hook_point, *states, model_name)
    feature_set.recipe = recipe
    feature_set.save(target)
    click.echo(f"wrote {target}: {len(feature_set.indices)} features at {feature_set.hook_point}")
    if top:
        click.echo(feature_table(feature_set, z_harm, harmful, top))


@cwac.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of cwac.subspace.")
def subspace(config: Path, output: Path | None):
    """Compute the safety subspace of the aligned model in CONFIG and write cwac.subspace."""
    from cwac_plugin.prepare import wanted_recipe
    from cwac_plugin.subspace import SubspaceData

    cfg, settings, target, max_length = _job(config, output, "subspace", "the file to write")
    data = SubspaceData.load(settings)  # data errors surface before the model is loaded
    model, tokenizer = _load_model(cfg, max_length, data.safety + (data.contrast or []) if data else [])
    _make_subspace(settings, data, model, tokenizer, max_length, target, wanted_recipe(cfg, settings, "subspace"))


@cwac.command("train-sae")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Write here instead of cwac.sae.")
def train_sae_command(config: Path, output: Path | None):
    """Train a TopK SAE at cwac.hook_point (default: 90% depth) on the safety and contrast data; write cwac.sae."""
    from cwac_plugin.prepare import wanted_recipe
    from cwac_plugin.sae import sae_training_activations

    cfg, settings, target, max_length = _job(config, output, "sae", "the SAE directory to write")
    examples = _sae_examples(config, settings)
    model, tokenizer = _load_model(cfg, max_length, examples)
    recipe = wanted_recipe(cfg, settings, "sae")
    settings = _with_hook_point(settings, model)
    activations = sae_training_activations(model, tokenizer, settings, examples, max_length)
    if activations is not None:
        _fit_sae(settings, activations, model, target, recipe)


@cwac.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of cwac.features.")
@click.option("--top", type=int, default=0, help="Print the N best features with the prompts that fire them most.")
def features(config: Path, output: Path | None, top: int):
    """Select the SAE features that separate harmful from benign prompts; write cwac.features."""
    from cwac_plugin.prepare import recorded_recipe, wanted_recipe
    from cwac_plugin.sae import load_sae

    cfg, settings, target, max_length = _job(config, output, "features", "the JSON to write")
    harmful, benign = _feature_examples(config, settings)
    try:
        sae_recipe = None if settings.sae_release else recorded_recipe(settings, "sae")
    except FileNotFoundError:
        sae_recipe = None  # load_sae, below, says what to do
    recipe = wanted_recipe(cfg, settings, "features", sae_recipe)
    sae = load_sae(settings)
    model, tokenizer = _load_model(cfg, max_length, harmful + benign)
    hook_point, states = _feature_states(settings, harmful, benign, model, tokenizer, max_length, sae)
    if states is not None:
        _select_features(settings, sae, hook_point, states, harmful, model, target, recipe, top)


@cwac.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def prepare(config: Path):
    """Make every artifact the cwac block needs (subspace, SAE, features), skipping those up to date.

    Each artifact records what it was made from (model, settings, data); one made from anything else
    is remade, and so are the features of a remade SAE. The model is loaded once, only if needed.
    Every forward comes first, so that under torchrun rank 0 trains the SAE and selects its features
    alone, from what the ranks gathered, while the others are done.
    """
    from cwac_plugin import own_data
    from cwac_plugin.data import check_lengths
    from cwac_plugin.plugin import settings_from
    from cwac_plugin.prepare import staleness
    from cwac_plugin.sae import load_sae, sae_training_activations
    from cwac_plugin.subspace import SubspaceData, measure_subspace

    cfg = load_axolotl_config(config)
    settings = settings_from(cfg)
    recipes, stale = staleness(cfg, settings)
    for artifact in recipes:
        _say(f"{artifact} ({getattr(settings, artifact) or settings.sae_release}): {stale.get(artifact, 'up to date')}")
    if not stale:
        _say("nothing to do")
        return
    for artifact in stale:
        if getattr(settings, artifact) is None:
            raise click.UsageError(f"{config}: set cwac.{artifact} (where to write it)")
    max_length = settings.max_length or cfg.sequence_len
    model = tokenizer = None
    if "own_data" in stale:  # first: everything else is computed from these data
        model, tokenizer = _load_model(cfg, max_length, [])
        summary = own_data.build(model, tokenizer, settings, max_length, recipes["own_data"])
        _say(f"wrote the own data beside {settings.own_data}: {own_data.describe(summary)}")
        recipes, stale = staleness(cfg, settings)
    data = SubspaceData.load(settings) if "subspace" in stale else None  # data errors before the model loads
    sae_examples = _sae_examples(config, settings) if "sae" in stale else []
    harmful, benign = _feature_examples(config, settings) if "features" in stale else ([], [])
    examples = (data.safety + (data.contrast or []) if data else []) + sae_examples + harmful + benign
    existing_sae = load_sae(settings) if "features" in stale and "sae" not in stale else None
    if model is None:
        model, tokenizer = _load_model(cfg, max_length, examples)
    else:
        check_lengths(tokenizer, examples, max_length)
    if "sae" in stale:
        settings = _with_hook_point(settings, model)
    if "subspace" in stale:
        solve_subspace = measure_subspace(model, tokenizer, settings, max_length, data)
    if "sae" in stale:
        activations = sae_training_activations(model, tokenizer, settings, sae_examples, max_length)
    if "features" in stale:
        hook_point, states = _feature_states(settings, harmful, benign, model, tokenizer, max_length, existing_sae)
    if not ranks.is_main_process():
        return
    if "subspace" in stale:
        _write_subspace(solve_subspace(), Path(settings.subspace), recipes["subspace"])
    if "sae" in stale:
        _fit_sae(settings, activations, model, Path(settings.sae), recipes["sae"])
    if "features" in stale:
        sae = existing_sae or load_sae(settings)
        _select_features(settings, sae, hook_point, states, harmful, model, Path(settings.features), recipes["features"], 0)


@cwac.command("eval")
@click.option("--model", "model_dir", required=True, help="HF model directory, or a hub id where a hub is reachable.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="PEFT adapter to merge into --model.")
@click.option("--prompts", required=True, type=click.Path(path_type=Path), help="Harmful prompts: jsonl (`prompt`) or text.")
@click.option("--task", type=click.Path(path_type=Path), help="Task test set: jsonl with `prompt` and `answer` (gives FA).")
@click.option(
    "--task-match", type=click.Choice(["first", "first_number", "first_word", "contains", "exact"]), default="first",
    show_default=True,
    help="first: the answer's first number (numeric answers) or first word; contains: as a whole word; exact.",
)
@click.option("--benign", type=click.Path(path_type=Path), help="Benign prompts (gives over-refusal and helpfulness).")
@click.option("--judge", default="phrase", show_default=True, help="'phrase' or 'hf:MODEL_DIR' (a text classifier).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="For harmful and benign prompts.")
@click.option("--task-max-new-tokens", type=int, default=16, show_default=True, help="For task prompts (short answers).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="prompts per generate call")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Load in this dtype (auto: the checkpoint's).")
@click.option("--load-in-4bit", is_flag=True, help="Load the model 4-bit (bitsandbytes NF4), as QLoRA trains it.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Report JSON to write.")
def eval_command(
    model_dir, adapter, prompts, task, task_match, benign, judge, max_new_tokens, task_max_new_tokens, batch_size, dtype,
    load_in_4bit, out,
):
    """Harmful score (and FA, over-refusal) of a model, with per-prompt records."""
    from cwac_plugin.data import write_json_atomically
    from cwac_plugin.eval import evaluate, load_model, load_prompts, make_judge

    harmful = load_prompts(prompts, "--prompts")
    task_records = load_prompts(task, "--task") if task else None
    if task_records and not all(isinstance(r.get("answer"), str) for r in task_records):
        raise click.UsageError(f"--task: every line of {task} needs a string field 'answer'")
    benign_records = load_prompts(benign, "--benign") if benign else None
    judge_fn = make_judge(judge)
    model, tokenizer = load_model(model_dir, adapter, dtype, load_in_4bit)
    report = evaluate(
        model, tokenizer, harmful, task_records, benign_records, judge_fn, task_match, max_new_tokens, batch_size,
        task_max_new_tokens,
    )
    report |= {
        "model": str(model_dir), "adapter": str(adapter) if adapter else None, "judge": judge, "task_match": task_match,
        "dtype": str(model.dtype).removeprefix("torch."), "load_in_4bit": load_in_4bit,
    }
    write_json_atomically(out, report)
    summary = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    click.echo(f"wrote {out}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))


@cwac.command()
@click.option("--before", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="`cwac eval --out` report of the aligned model.")
@click.option("--after", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="`cwac eval --out` report of the fine-tuned model, on the same prompts.")
@click.option("--verify", "verify_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="`cwac verify --out` result, shown beside the scores.")
@click.option("--names", nargs=2, default=("aligned", "fine-tuned"), show_default=True, help="What to call the two.")
@click.option("--examples", type=int, default=20, show_default=True, help="Changed answers to show side by side, per kind.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory for report.md and report.png.")
def report(before, after, verify_json, names, examples, out):
    """Before and after on the same prompts: scores with intervals, leakage, and the answers that changed."""
    from cwac_plugin import report as reporting

    saved = {}
    for key, path in (("--before", before), ("--after", after)):
        saved[key] = json.loads(path.read_text(encoding="utf-8"))
        if not saved[key].get("records"):
            raise click.UsageError(f"{key}: {path} is not a `cwac eval` report (no `records`)")
    for field in ("records", "benign_records", "task_records"):
        prompts = [{r["prompt"] for r in saved[key].get(field) or []} for key in ("--before", "--after")]
        if prompts[0] != prompts[1]:
            raise click.UsageError(f"--before and --after were evaluated on different {field} prompts: run both on the same files")
    first, second = (reporting.rejudged(saved[key]) for key in ("--before", "--after"))
    verification = json.loads(verify_json.read_text(encoding="utf-8")) if verify_json else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(reporting.markdown(first, second, tuple(names), verification, examples), encoding="utf-8")
    reporting.plot(first, second, tuple(names), out / "report.png")
    click.echo(f"wrote {out / 'report.md'} and {out / 'report.png'}")


@cwac.command()
@click.option("--base", required=True, help="The aligned model: an HF directory, or a hub id where a hub is reachable.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="Saved LoRA/QLoRA adapter directory.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), help="Saved fully fine-tuned model.")
@click.option("--subspace", "subspace_path", required=True, type=click.Path(path_type=Path), help="The subspace file.")
@click.option("--tolerance", type=float, help="Largest leakage that passes [1e-5; a half-precision save's roundoff].")
@click.option("--allow-partial", is_flag=True, help="Pass even if changed decoder weights are unprotected.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON.")
def verify(base, adapter, model_dir, subspace_path, tolerance, allow_partial, out):
    """Check from saved artifacts alone that a fine-tune kept out of the subspace; exit 1 if not."""
    from cwac_plugin.data import write_json_atomically
    from cwac_plugin.subspace import Subspace
    from cwac_plugin.verify import verify as verify_update

    result = verify_update(Subspace.load(subspace_path, key="--subspace"), base, adapter, model_dir)
    click.echo(result.table())
    tolerance = result.default_tolerance if tolerance is None else tolerance
    failures = result.failures(tolerance, allow_partial)
    if out:
        write_json_atomically(out, {**result.summary(), "tolerance": tolerance, "passed": not failures})
    if failures:
        click.echo("FAILED: " + "; ".join(failures), err=True)
        sys.exit(1)
    click.echo(f"passed: leakage within {tolerance:.0e}")


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


if __name__ == "__main__":  # `torchrun --nproc_per_node N -m cwac_plugin.cli prepare CONFIG`
    main()
