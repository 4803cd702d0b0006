"""`cwac prepare`: every artifact the `cwac` block needs, made once and remade only when stale.

Each artifact records its *recipe*: the model, the `cwac` settings it depends on, the content of the
data files it was made from and, for the features, the SAE's recipe (not `max_length`: no example is
ever truncated, so it changes nothing made). It is up to date when that record equals what the block
asks for now, so changing `cwac.rank` redoes the subspace only, and a retrained SAE redoes the
features too. Training refuses a missing or stale artifact, naming what changed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from cwac_plugin import own_data
from cwac_plugin.config import CWACConfig
from cwac_plugin.errors import ArtifactError

RECIPE_KEY = "cwac_recipe"
NO_RECIPE = "records no recipe (made by an older cwac_plugin or through the Python API)"

# the settings each artifact depends on, beside the model and the data
SETTINGS = {
    "subspace": (
        "subspace_method", "rank", "energy", "output_rank", "target_modules", "layers", "contrast_beta",
        "delta_base_model", "batch_size", "max_examples",
    ),
    "sae": ("hook_point", "sae_width", "sae_k", "sae_training_tokens", "sae_batch_tokens", "sae_lr", "max_examples"),
    "features": ("hook_point", "num_features", "feature_score", "max_examples"),
    "own_data": own_data.SETTINGS,
}


def file_digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def needed(settings: CWACConfig) -> list[str]:
    """The artifacts the block uses, in the order they are made (all read the data; features the SAE)."""
    artifacts = ["own_data"] if settings.own_data else []
    artifacts += ["subspace"] if settings.weight_constraint else []
    if settings.activation_constraint:
        artifacts += ([] if settings.sae_release else ["sae"]) + ["features"]
    return artifacts


def model_identity(cfg) -> dict:
    """The model the artifacts are computed on, and what decides how the data are tokenised. Its
    precision is checked apart (`check_precision_matches`, which `cwac.allow_precision_mismatch` waives)."""
    return {key: cfg.get(key) for key in ("base_model", "revision_of_model", "chat_template")}


def wanted_recipe(cfg, settings: CWACConfig, artifact: str, sae_recipe: dict | None = None) -> dict:
    """What `artifact` is made from now; for the features, `sae_recipe` is the recipe of the SAE they
    are selected from (a hub SAE is named by its release and id instead)."""
    recipe = {
        "artifact": artifact,
        "model": model_identity(cfg),
        "settings": {key: getattr(settings, key) for key in SETTINGS[artifact]},
        "data": {key: file_digest(getattr(settings, key)) for key in ("safety_data", "contrast_data")},
    }
    if artifact == "own_data":  # made from the shipped prompts that fit, not from the files it makes
        recipe["data"] = own_data.shipped_digests()
        recipe["settings"]["max_length"] = settings.max_length or cfg.get("sequence_len")
        recipe["settings"]["own_contrast"] = settings.own_contrast
    if artifact == "features":
        recipe["sae"] = {"release": settings.sae_release, "id": settings.sae_id} if settings.sae_release else sae_recipe
    return json.loads(json.dumps(recipe))  # as it reads back from a file: tuples as lists


def recorded_recipe(settings: CWACConfig, artifact: str) -> dict | None:
    """The recipe an existing artifact records: None if it records none (an older version, the Python
    API, or a file too malformed to tell: its loader says what is wrong with it), `{"external": path}`
    for an SAE not trained by cwac_plugin (a sae-lens directory without our report), used as it is.
    Raises FileNotFoundError for a missing artifact."""
    if getattr(settings, artifact) is None:
        raise FileNotFoundError(f"cwac.{artifact} is not set")
    path = Path(getattr(settings, artifact))
    if artifact == "sae" and (path / "cfg.json").is_file() and not (path / "cwac_report.json").is_file():
        return {"external": str(path)}
    file = path / "cwac_report.json" if artifact == "sae" else path
    if not file.is_file() or artifact == "own_data" and not own_data.files_present(settings):
        raise FileNotFoundError(path)
    try:
        if artifact == "subspace":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(RECIPE_KEY)
            return json.loads(text) if text else None
        return json.loads(file.read_text()).get("recipe")
    except Exception:  # noqa: BLE001 -- malformed: left to the artifact's own loader to describe
        return None


def differences(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs."""
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old} -> {new}")
    return out


def staleness(cfg, settings: CWACConfig, at_training: bool = False) -> tuple[dict[str, dict], dict[str, str]]:
    """(the wanted recipe of each needed artifact, why each stale one must be made: missing / what changed).

    `at_training`: a data file absent where training runs (it needs none for the weight constraint alone)
    is not compared: its absence says nothing about the artifact.
    """
    recipes, stale = {}, {}
    sae_recipe = None  # what the features must have been selected from

    def remade(artifact: str) -> bool:  # `cwac prepare` remakes every stale artifact; training keeps old ones
        return artifact in stale and not (at_training and stale[artifact] == NO_RECIPE)

    for artifact in needed(settings):
        anchors = settings.activation_constraint and settings.act_anchor == "safety"
        if artifact == "own_data" and at_training and not anchors and not Path(settings.own_data).is_file():
            continue  # read by training only as anchors: the artifacts made from them, if made elsewhere, are checked
        recipes[artifact] = wanted_recipe(cfg, settings, artifact, sae_recipe)
        try:
            recorded = recorded_recipe(settings, artifact)
        except FileNotFoundError:
            stale[artifact] = "missing"
            sae_recipe = recipes[artifact] if artifact == "sae" else sae_recipe
            continue
        wanted = recipes[artifact]
        if at_training and recorded:
            for key, digest in list(wanted["data"].items()):
                if digest is None:
                    recorded.get("data", {}).pop(key, None)
                    wanted["data"].pop(key)
        if recorded is None:
            stale[artifact] = NO_RECIPE
        elif "external" in recorded:
            recipes[artifact] = recorded
        elif artifact != "own_data" and remade("own_data"):
            stale[artifact] = "its data are remade"
        elif artifact == "features" and remade("sae"):
            stale[artifact] = "its SAE is remade"
        elif recorded != wanted:
            stale[artifact] = "; ".join(differences(recorded, wanted)[:4])
        if artifact == "sae":  # the features follow the SAE as it will be: remade as wanted, or kept
            sae_recipe = recipes[artifact] if remade(artifact) else recorded
    return recipes, stale


def check_prepared(cfg, settings: CWACConfig) -> None:
    """Refuse to train with a missing artifact or one made from something else than the block says.

    An artifact that records no recipe (made by an older version, or through the Python API) is left
    to the checks each artifact does of itself (`check_settings_match`, `FeatureSet.check_against`).
    """
    _, stale = staleness(cfg, settings, at_training=True)
    for artifact, why in stale.items():
        if why != NO_RECIPE and getattr(settings, artifact) is not None:  # unset: its loader asks for it
            state = "missing" if why == "missing" else f"stale ({why})"
            key = "cwac.safety_data (unset: the model's own answers)" if artifact == "own_data" else f"cwac.{artifact}"
            raise ArtifactError(f"{key}: {getattr(settings, artifact)} is {state}: run `cwac prepare {config_name()}`")


def config_name() -> str:
    """The YAML `axolotl train` was given, for the message that says how to fix a stale artifact."""
    return next((arg for arg in sys.argv[1:] if arg.endswith((".yml", ".yaml"))), "CONFIG.yml")
