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
}


def file_digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def needed(settings: CWACConfig) -> list[str]:
    """The artifacts the block uses, in the order they are made (features read the SAE)."""
    artifacts = ["subspace"] if settings.weight_constraint else []
    if settings.activation_constraint:
        artifacts += ([] if settings.sae_release else ["sae"]) + ["features"]
    return artifacts


def model_identity(cfg) -> str:
    """The model the artifacts are computed on. Its precision is checked apart (`check_precision_matches`,
    which `cwac.allow_precision_mismatch` can waive)."""
    return str(cfg.get("base_model"))


def wanted_recipe(cfg, settings: CWACConfig, artifact: str, recipes: dict[str, dict] | None = None) -> dict:
    recipe = {
        "artifact": artifact,
        "model": model_identity(cfg),
        "settings": {key: getattr(settings, key) for key in SETTINGS[artifact]},
        "data": {key: file_digest(getattr(settings, key)) for key in ("safety_data", "contrast_data")},
    }
    if artifact == "features":
        recipe["sae"] = (recipes or {}).get("sae") or {"release": settings.sae_release, "id": settings.sae_id}
    return json.loads(json.dumps(recipe))  # as it reads back from a file: tuples as lists


def recorded_recipe(settings: CWACConfig, artifact: str) -> dict | None:
    """The recipe an existing artifact records; None for one made before recipes were recorded.
    Raises FileNotFoundError for a missing artifact."""
    path = Path(getattr(settings, artifact) or "")
    if artifact == "subspace":
        if not path.is_file():
            raise FileNotFoundError(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(RECIPE_KEY)
        return json.loads(text) if text else None
    file = path / "cwac_report.json" if artifact == "sae" else path
    if not file.is_file():
        raise FileNotFoundError(path)
    return json.loads(file.read_text()).get("recipe")


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


def staleness(cfg, settings: CWACConfig) -> tuple[dict[str, dict], dict[str, str]]:
    """(the wanted recipe of each needed artifact, why each stale one must be made: missing / what changed)."""
    recipes, stale = {}, {}
    for artifact in needed(settings):
        recipes[artifact] = wanted_recipe(cfg, settings, artifact, recipes)
        try:
            recorded = recorded_recipe(settings, artifact)
        except FileNotFoundError:
            stale[artifact] = "missing"
            continue
        if recorded is None:
            stale[artifact] = NO_RECIPE
        elif artifact == "features" and "sae" in stale:
            stale[artifact] = "its SAE is remade"
        elif recorded != recipes[artifact]:
            stale[artifact] = "; ".join(differences(recorded, recipes[artifact])[:4])
    return recipes, stale


def check_prepared(cfg, settings: CWACConfig) -> None:
    """Refuse to train with a missing artifact or one made from something else than the block says.

    An artifact that records no recipe (made by an older version, or through the Python API) is left
    to the checks each artifact does of itself (`check_settings_match`, `FeatureSet.check_against`).
    """
    _, stale = staleness(cfg, settings)
    for artifact, why in stale.items():
        if why != NO_RECIPE:
            state = "missing" if why == "missing" else f"stale ({why})"
            raise ArtifactError(f"cwac.{artifact}: {getattr(settings, artifact)} is {state}: run `cwac prepare {config_name()}`")


def config_name() -> str:
    """The YAML `axolotl train` was given, for the message that says how to fix a stale artifact."""
    return next((arg for arg in sys.argv[1:] if arg.endswith((".yml", ".yaml"))), "CONFIG.yml")
