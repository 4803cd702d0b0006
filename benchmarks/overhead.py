"""Step time and memory of CWAC against plain training, measured side by side (interleaved).

    python benchmarks/overhead.py --model tiny --training lora --out benchmarks/results/overhead/tiny_lora.json
    python benchmarks/overhead.py --model runs/smollm2/model --training qlora --out benchmarks/results/overhead/smollm2_qlora.json
    python benchmarks/overhead.py --fsdp2 --model tiny --training lora --methods plain weight-update cwac \
        --out benchmarks/results/overhead/fsdp2_tiny_lora.json

Each repeat trains every method for `--steps` steps from the same initial weights and data, in turn,
each run in a fresh process, so that machine noise hits all methods alike and each run's peak
memory is its own; the first step of each run is dropped (warm-up). The subspace (random
orthonormal bases, rank 16 on every linear module), the SAE (an untrained TopK SAE, 8x wide) and
the 32 features are synthetic: the cost does not depend on their quality.
Memory: the peak resident set of the run's process (CPU) or peak allocated CUDA memory, both from
after the model is loaded, and the bytes the constraints hold (bases, W0 U and V^T W0 targets, the
leakage metric's sketch of W0, SAE). Per step also the kernel CPU time and minor page faults: on CPU
a step's time also goes there, which the profiler does not see. `--profile` runs each method once
under torch.profiler and writes its table to profiles/ beside --out.
`--fsdp2`: each run is 2 torchrun processes (gloo on CPU) training the model sharded by FSDP2 through
the Trainer's own `fsdp` arguments; rank 0 reports its step times, and per step the collectives its
process issued (FSDP2's all-gathers, CWAC's all-reduces) and any `full_tensor()` (a weight gathered whole).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from cwac_plugin.config import DEFAULT_TARGET_MODULES, CWACConfig
from cwac_plugin.data import Batches, Example, write_json_atomically

from toy import ToyTokenizer, llama8b_shaped, random_llama

METHODS = {
    "plain": None,
    "weight-update": {"projection": "update"},
    "weight-gradient": {"projection": "gradient"},
    "activation-safety": {"weight_constraint": False, "activation_constraint": True, "act_anchor": "safety"},
    "activation-batch": {"weight_constraint": False, "activation_constraint": True, "act_anchor": "batch"},
    "cwac": {"activation_constraint": True},
}


class CollectiveCounter(TrainerCallback):
    """Collectives and whole-weight gathers issued inside training steps, per step: what CWAC adds
    under FSDP2 beside FSDP2's own all-gathers."""

    COUNTED = ("all_gather_single", "all_gather_into_tensor", "all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "broadcast")

    def __init__(self):
        from torch.distributed.tensor import DTensor

        self.counts = dict.fromkeys((*self.COUNTED, "full_tensor"), 0)
        self.steps = 0
        self._in_step = False
        for module in (torch.distributed, torch.distributed.distributed_c10d):  # FSDP2 calls the latter's
            for name in self.COUNTED:
                setattr(module, name, self._counting(name, getattr(torch.distributed.distributed_c10d, name)))
        DTensor.full_tensor = self._counting("full_tensor", DTensor.full_tensor)

    def _counting(self, name, function):
        def counted(*args, **kwargs):
            if self._in_step:
                self.counts[name] += 1
            return function(*args, **kwargs)

        return counted

    def on_step_begin(self, args, state, control, **kwargs):
        self._in_step = True

    def on_step_end(self, args, state, control, **kwargs):
        self._in_step = False
        self.steps += 1

    def per_step(self) -> dict[str, float]:
        return {name: count / max(self.steps, 1) for name, count in self.counts.items()}


class StepTimer(TrainerCallback):
    """Wall time per step, and the process's kernel time and page faults in it: on CPU, where a step's
    time goes outside the torch ops (the profiler sees only those)."""

    def __init__(self):
        self.times: list[float] = []
        self.system_seconds: list[float] = []
        self.page_faults: list[int] = []
        self._start = (0.0, None)

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF))

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, usage = self._start
        now = resource.getrusage(resource.RUSAGE_SELF)
        self.times.append(time.perf_counter() - start)
        self.system_seconds.append(now.ru_stime - usage.ru_stime)
        self.page_faults.append(now.ru_minflt - usage.ru_minflt)


def device_name(device: str) -> str:
    """What the results ran on, for the JSON beside them."""
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()


def model_dir(name: str, work: Path) -> Path:
    """An HF directory. The random models, `tiny` (a 4-layer Llama, 256 wide) and `llama8b-N` (N
    layers of Llama-3-8B's shape), are saved once, so that 4-bit loading works for them too."""
    shaped = re.fullmatch(r"llama8b-(\d+)", name)
    if name != "tiny" and not shaped:
        return Path(name)
    path = work / name
    if not (path / "config.json").exists():
        (llama8b_shaped(int(shaped[1])) if shaped else random_llama(256)).save_pretrained(path)
    return path


def load_model(path: Path, training: str, device: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = None
    if training == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=quantization, device_map={"": device}
    )
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tokenizer


def synthetic_artifacts(model, work: Path, rank: int = 16, n_features: int = 32, output_rank: int = 0) -> CWACConfig:
    from sae_lens import TopKSAE, TopKSAEConfig

    from cwac_plugin.models import find_target_modules, model_metadata
    from cwac_plugin.subspace import Subspace

    g = torch.Generator().manual_seed(0)
    bases = {
        name: torch.linalg.qr(torch.randn(module.in_features, rank, generator=g))[0]
        for name, module in find_target_modules(model, DEFAULT_TARGET_MODULES).items()
    }
    outputs = {
        name: torch.linalg.qr(torch.randn(module.out_features, output_rank, generator=g))[0]
        for name, module in find_target_modules(model, DEFAULT_TARGET_MODULES).items()
    } if output_rank else {}
    Subspace(bases, outputs, metadata=model_metadata(model)).save(work / "subspace.safetensors")
    hidden = model.config.hidden_size
    layer = model.config.num_hidden_layers // 2
    sae = TopKSAE(TopKSAEConfig(d_in=hidden, d_sae=8 * hidden, k=32))
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae.save_model(work / "sae")
    features = {
        "hook_point": f"blocks.{layer}.hook_resid_post", "sae": str(work / "sae"),
        "indices": list(range(n_features)), "scores": [1.0] * n_features, "reference_scale": [1.0] * n_features,
        "score_method": "synthetic", "d_sae": 8 * hidden, "model": "", "format": "cwac-features/1",
    }
    (work / "features.json").write_text(json.dumps(features))
    return CWACConfig(
        subspace=str(work / "subspace.safetensors"), sae=str(work / "sae"), features=str(work / "features.json"),
        rank=rank, num_features=n_features, output_rank=output_rank,
    )


def reset_peak_memory() -> None:
    """Peak memory from here on, after the model is loaded: on CPU, loading a large model (a float32
    checkpoint read into a bf16 model) can set the process's peak and hide what training adds."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set


def peak_rss_bytes() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def constraint_bytes(weight, activation) -> int:
    held = []
    if weight is not None:
        for tensor in weight.tensors:
            held += [tensor.input_basis, tensor.output_basis, tensor.input_target, tensor.output_target]
        for full in weight._full.values():
            held += [full.sketch, full.initial_sketched]
    if activation is not None:
        held += [*activation.sae.parameters(), *(activation.selected_encoder or ())]
    unique = {id(t): t for t in held if t is not None}
    return sum(t.numel() * t.element_size() for t in unique.values())


def run_once(args, method: str, device: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from cwac_plugin.hf import install
    from cwac_plugin.projection import WeightConstraint
    from cwac_plugin.sae import ActivationConstraint, FeatureSet, load_sae
    from cwac_plugin.subspace import Subspace

    cfg = CWACConfig.model_validate_json((args.work / "cwac.json").read_text())
    model, tokenizer = load_model(model_dir(args.model, args.work), args.training, device, getattr(torch, args.dtype))
    if args.training in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=DEFAULT_TARGET_MODULES, task_type="CAUSAL_LM"))
        if args.gradient_checkpointing:
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    reset_peak_memory()
    sharding = {}
    if args.fsdp2:
        sharding = {"fsdp": "full_shard", "fsdp_config": {
            "fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "reshard_after_forward": True,
        }}
        if device == "cpu":
            sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
            from cpu_fsdp_plugin import CPUFSDPPlugin  # FSDP2 on CPU processes, as the tests run it

            CPUFSDPPlugin().register(None)
    training_args = TrainingArguments(
        output_dir=str(args.work / "trainer"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-4, report_to=[], save_strategy="no", logging_steps=1, use_cpu=device == "cpu",
        remove_unused_columns=False, seed=0, gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": True},  # Axolotl's default
        **sharding,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=training_data(args, model.config.vocab_size))
    timer = StepTimer()
    trainer.add_callback(timer)
    collectives = CollectiveCounter() if args.fsdp2 else None
    if collectives:
        trainer.add_callback(collectives)
    weight = activation = None
    update = METHODS[method]
    if update is not None:
        settings = cfg.model_copy(update=update)
        if settings.weight_constraint:
            weight = WeightConstraint(trainer.model, Subspace.load(settings.subspace), settings.projection)
        if settings.activation_constraint:
            anchors = [Example(f"how do i make a weapon number {i}", "sorry, i cannot help") for i in range(16)]
            batches = Batches(tokenizer or ToyTokenizer(), anchors, 64, settings.anchor_batch_size, device)
            # Loaded on the CPU as the plugin does: the constraint moves only what it keeps to the device.
            activation = ActivationConstraint(trainer.model, load_sae(settings), FeatureSet.load(settings.features), settings, batches)
        install(trainer, weight=weight, activation=activation)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as profiler:
            trainer.train()
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=25)
        profiles = args.out.parent / "profiles"
        profiles.mkdir(exist_ok=True)
        (profiles / f"{args.out.stem}_{method}.txt").write_text(table)
    else:
        trainer.train()
    return {
        "step_seconds": statistics.median(timer.times[1:]),
        "system_seconds_per_step": statistics.median(timer.system_seconds[1:]),
        "page_faults_per_step": statistics.median(timer.page_faults[1:]),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "peak_rss_bytes": None if torch.cuda.is_available() else peak_rss_bytes(),
        "constraint_bytes": constraint_bytes(weight, activation),
        **({"collectives_per_step": collectives.per_step()} if collectives else {}),
        "sharded_parameters": sum(hasattr(p, "full_tensor") for p in trainer.model_wrapped.parameters()),
    }


def training_data(args, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size * args.steps, args.seq_len), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def in_fresh_process(args, method: str) -> dict:
    """One measured run in its own process: its peak memory is not the previous run's."""
    launcher = ["torchrun", "--nproc_per_node", "2"] if args.fsdp2 else [sys.executable]
    command = [*launcher, __file__, "--run-one", method, *sys.argv[1:]]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'llama8b-N' (random models, see model_dir) or an HF model directory")
    parser.add_argument("--training", choices=["lora", "qlora", "full"], default="lora")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the model's (and the SAE's) dtype")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as Axolotl's `gradient_checkpointing: true`")
    parser.add_argument("--profile", action="store_true", help="One run per method under torch.profiler; tables in profiles/ beside --out.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fsdp2", action="store_true", help="2 torchrun processes, the model sharded by FSDP2.")
    parser.add_argument("--output-rank", type=int, default=0, help="Output bases too (the output side's all-reduce under FSDP2).")
    parser.add_argument("--run-one", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.out.parent / "work"
    args.work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.run_one:
        result = run_once(args, args.run_one, device)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return

    model, _ = load_model(model_dir(args.model, args.work), "full", device)
    artifacts = synthetic_artifacts(model, args.work, output_rank=args.output_rank)
    (args.work / "cwac.json").write_text(artifacts.model_dump_json())
    del model
    methods = [m for m in args.methods if not (m == "activation-batch" and args.training == "full")]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for repeat in range(1 if args.profile else args.repeats):
        for method in methods:
            runs[method].append(in_fresh_process(args, method))
            print(f"repeat {repeat} {method}: {runs[method][-1]}", flush=True)
    if args.profile:
        return
    base = runs.get("plain")
    table = {}
    for method, results in runs.items():
        step = statistics.median(r["step_seconds"] for r in results)
        peak = statistics.median(r["peak_cuda_bytes"] or r["peak_rss_bytes"] for r in results)
        row = {
            "median_step_seconds": round(step, 4),
            "step_seconds_all": [round(r["step_seconds"], 4) for r in results],
            "system_seconds_per_step_all": [round(r["system_seconds_per_step"], 4) for r in results],
            "page_faults_per_step_all": [r["page_faults_per_step"] for r in results],
            "peak_bytes": int(peak),
            "constraint_bytes": results[0]["constraint_bytes"],
            **({"collectives_per_step": results[0]["collectives_per_step"]} if args.fsdp2 else {}),
        }
        if base:
            row["step_ratio"] = round(step / statistics.median(r["step_seconds"] for r in base), 3)
            row["peak_ratio"] = round(peak / statistics.median(r["peak_cuda_bytes"] or r["peak_rss_bytes"] for r in base), 3)
        table[method] = row
    write_json_atomically(args.out, {
        "model": args.model, "training": args.training, "steps": args.steps, "repeats": args.repeats,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "output_rank": args.output_rank, "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": args.dtype, "fsdp2_processes": 2 if args.fsdp2 else None,
        "device": device_name(device),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "peak_memory": "peak allocated CUDA bytes" if device == "cuda" else "peak resident set of the run's process after model loading",
        "methods": table,
    })
    for method, row in table.items():
        print(
            f"{method:18s} {row['median_step_seconds']:.4f} s/step  x{row.get('step_ratio')}  "
            f"peak {row['peak_bytes'] / 2**20:.0f} MiB x{row.get('peak_ratio')}  constraints {row['constraint_bytes'] / 2**20:.2f} MiB"
        )


if __name__ == "__main__":
    main()
