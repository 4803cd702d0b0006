"""The weight constraint's per-step projection of LoRA factors: stacked against one by one.

    python benchmarks/enforce.py --model runs/smollm2/model --subspace runs/smollm2/subspace.safetensors \
        --out benchmarks/results/overhead/enforce_smollm2.json

Update mode projects every trained LoRA factor after each optimizer step. `WeightConstraint.enforce`
stacks the factors of each shape and projects them with one batched product; the one-by-one
path (`ProtectedTensor.enforce`, still what DeepSpeed-managed parameters and full weights take) is
timed beside it in the same process, on the same model: LoRA r 16 on every linear module, and
--subspace (default: overhead.py's synthetic one, input bases only). Reported: median milliseconds per call over --calls
calls, and the number of torch ops per call (on a GPU each is a kernel launch or host-side work).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import profile

from cwac_plugin.config import DEFAULT_TARGET_MODULES
from cwac_plugin.data import write_json_atomically
from cwac_plugin.projection import WeightConstraint
from cwac_plugin.subspace import Subspace

from overhead import device_name, load_model, model_dir, synthetic_artifacts


def timed(call, calls: int, device: str) -> dict:
    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        call()
    times = []
    for _ in range(calls):
        synchronize()
        start = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - start)
    with profile() as profiler:
        call()
    return {
        "median_ms": round(1e3 * statistics.median(times), 3),
        "ops_per_call": sum(event.count for event in profiler.key_averages()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'llama8b-N' (random models, see overhead.model_dir) or an HF model directory")
    parser.add_argument("--subspace", type=Path, help="a `cwac subspace` file for --model")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = args.out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from peft import LoraConfig, get_peft_model

    model, _ = load_model(model_dir(args.model, work), "lora", device)
    subspace = Subspace.load(args.subspace or synthetic_artifacts(model, work).subspace)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=DEFAULT_TARGET_MODULES, task_type="CAUSAL_LM"))
    constraint = WeightConstraint(model, subspace)

    def one_by_one():
        with torch.no_grad():
            for tensor in constraint.tensors:
                tensor.enforce()

    results = {"stacked": timed(constraint.enforce, args.calls, device), "one_by_one": timed(one_by_one, args.calls, device)}
    write_json_atomically(args.out, {
        "model": args.model, "subspace": str(args.subspace or "synthetic"), "factors": len(constraint.tensors), "shapes": len(constraint._factor_stacks),
        "device": device_name(device),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "calls": args.calls, **results,
    })
    print(f"{len(constraint.tensors)} factors in {len(constraint._factor_stacks)} shapes: {results}")


if __name__ == "__main__":
    main()
