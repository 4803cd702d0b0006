"""Test-only Axolotl plugin: lets multi-process and bf16 runs work on CPU-only machines.

With world size > 1 Axolotl sets `device_map` to the integer local rank, which means a CUDA
device; without CUDA, loading fails. `register` runs before `device_map` is set (earlier than
`pre_model_load`), so it wraps the method that sets it. With `bf16: true` transformers' training
arguments refuse a machine without a bf16 GPU unless `use_cpu` is set, which Axolotl never passes.
"""

import torch
from axolotl.integrations.base import BasePlugin


class CPUDeviceMapPlugin(BasePlugin):
    def register(self, cfg):
        from axolotl.loaders.model import ModelLoader

        original = ModelLoader._set_device_map_config
        if getattr(original, "_cpu_patched", False):
            return

        def set_device_map_config(loader):
            original(loader)
            if not torch.cuda.is_available() and isinstance(loader.model_kwargs.get("device_map"), (dict, int)):
                loader.model_kwargs["device_map"] = {"": "cpu"}

        set_device_map_config._cpu_patched = True
        ModelLoader._set_device_map_config = set_device_map_config

    def get_training_args(self, cfg):
        return {"use_cpu": True} if cfg.bf16 and not torch.cuda.is_available() else None
