"""CWAC: Coupled Weight and Activation Constraints for safety-preserving fine-tuning.

`cwac_plugin.CWACPlugin` is what Axolotl's `plugins:` list names. It is imported lazily so that
the core (subspace, projection) serves plain HF Trainer users without importing Axolotl.
"""

__version__ = "0.1.0"

__all__ = ["CWACPlugin", "__version__"]


def __getattr__(name: str):
    if name == "CWACPlugin":
        from cwac_plugin.plugin import CWACPlugin

        return CWACPlugin
    raise AttributeError(f"module 'cwac_plugin' has no attribute {name!r}")
