"""The errors a user can act on: each names the file or YAML key at fault and the fix."""


class SubspaceError(ValueError):
    """A subspace file is missing, malformed, or does not fit the model."""


class SAEConfigError(ValueError):
    """The SAE, hook point or feature file does not fit the model."""


class ArtifactError(ValueError):
    """A precomputed artifact is missing or was made from other settings, data or model."""
