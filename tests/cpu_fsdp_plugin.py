"""Test-only Axolotl plugin: FSDP2 in CPU processes (gloo), as it runs on GPUs.

Three things keep FSDP off a CPU-only machine, none of them in FSDP2 itself (`fully_shard` runs on
a CPU mesh): Axolotl builds its device mesh for "cuda"; accelerate's PartialState, without CUDA and
unless told `cpu=True` (which Axolotl never passes), leaves a torchrun job undistributed, on which
transformers refuses FSDP; and accelerate's AcceleratorState turns FSDP on only for accelerator
backends, not MULTI_CPU. `register` runs before any of them, so it patches the three. Add it after
cpu_device_map_plugin.CPUDeviceMapPlugin.
"""

import torch
from axolotl.integrations.base import BasePlugin


class CPUFSDPPlugin(BasePlugin):
    def register(self, cfg):
        from accelerate import parallelism_config, state
        from accelerate.utils import DistributedType

        if torch.cuda.is_available() or getattr(state.AcceleratorState.__init__, "_cpu_fsdp", False):
            return
        build_device_mesh = parallelism_config.ParallelismConfig.build_device_mesh
        parallelism_config.ParallelismConfig.build_device_mesh = lambda self, _device: build_device_mesh(self, "cpu")
        prepare_backend = state.PartialState._prepare_backend
        state.PartialState._prepare_backend = lambda self, cpu=False, *args, **kwargs: prepare_backend(self, True, *args, **kwargs)
        init = state.AcceleratorState.__init__

        def init_with_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
            init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin

        init_with_cpu_fsdp._cpu_fsdp = True
        state.AcceleratorState.__init__ = init_with_cpu_fsdp

    def get_training_args(self, cfg):
        return {"use_cpu": True} if not torch.cuda.is_available() else None
