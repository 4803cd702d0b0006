"""Keeping weight updates out of the safety subspace.

The math is two projections of a matrix X (a weight, a LoRA factor or a gradient):

    input side   X <- X - (X U - R) U^T        afterwards X U = R      (R = 0 for gradients, LoRA A)
    output side  X <- X - V (V^T X - Q)        afterwards V^T X = Q    (Q = 0 for gradients, LoRA B)

They act on opposite sides, so they commute and applying both gives the orthogonal projection
onto {X : X U = R, V^T X = Q}. Applied to a full weight with R = W0 U, Q = V^T W0 this keeps
dW = W - W0 with dW U = 0 and V^T dW = 0; applied to LoRA's A (input) and B (output) it keeps
dW = s B A out of the subspace without touching the (possibly 4-bit) base weight.

`WeightConstraint` binds a `Subspace` to the trainable tensors of a model. It knows nothing of
Axolotl, so a plain HF Trainer or TRL user can drive it through `cwac_plugin.hf.CWACCallback`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cwac_plugin.errors import SubspaceError
from cwac_plugin.guards import coverage_of
from cwac_plugin.models import base_model_of, is_lora_wrapper, linear_of, resolve_modules
from cwac_plugin.parallel import (
    RowShards,
    _managed_by_deepspeed,
    is_row_sharded,
    read_model_param,
    read_param,
    write_param,
)
from cwac_plugin.subspace import Subspace, check_precision_matches


def project_input_side(x: Tensor, basis: Tensor, target: Tensor | None = None) -> Tensor:
    """Return x moved within span(basis)'s row action so that x @ basis == target (or 0)."""
    residual = x @ basis
    if target is not None:
        residual = residual - target
    return x - residual @ basis.T


def project_output_side(
    x: Tensor, basis: Tensor, target: Tensor | None = None, sum_rows: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Return x moved so that basis.T @ x == target (or 0).

    With x and basis holding only some rows of the full matrices (FSDP2), `sum_rows` adds up the
    ranks' `basis.T @ x`: the only product of the two projections that spans rows.
    """
    residual = basis.T @ x
    if sum_rows is not None:
        residual = sum_rows(residual)
    if target is not None:
        residual = residual - target
    return x - basis @ residual


# ---------------------------------------------------------------------------------------------
# Binding a subspace to a model.
# ---------------------------------------------------------------------------------------------


@dataclass
class ProtectedTensor:
    """A trainable tensor with the bases and targets its value must keep.

    Under FSDP2 (`shards` set) `param` holds this rank's rows, and so do the row-indexed
    `output_basis` (V) and `input_target` (R = W0 U); `input_basis` and `output_target` span columns
    and stay whole.
    """

    module_name: str
    param: nn.Parameter
    owner: nn.Module  # holds `param` as `weight`: where to find it again once a wrapper replaces it
    input_basis: Tensor | None = None
    output_basis: Tensor | None = None
    input_target: Tensor | None = None
    output_target: Tensor | None = None
    shards: RowShards | None = None

    def sum_rows(self, partial: Tensor) -> Tensor:
        """A product over this tensor's rows, summed over the ranks that hold the others."""
        return self.shards.sum(partial) if self.shards is not None else partial

    def read_run(self) -> Tensor:
        """What the forward runs and a save writes, in float32 (this rank's rows under FSDP2)."""
        return read_param(self.param) if self.shards is not None else read_model_param(self.param)

    def project(self, value: Tensor, targets: bool = True) -> Tensor:
        """`value` (shaped like `read_param`) moved onto the constraint; without `targets`, for a
        gradient or a LoRA factor, onto X U = 0 and V^T X = 0."""
        if self.input_basis is not None:
            value = project_input_side(value, self.input_basis, self.input_target if targets else None)
        if self.output_basis is not None:
            value = project_output_side(value, self.output_basis, self.output_target if targets else None, self.sum_rows)
        return value

    def project_gradient(self, grad: Tensor) -> Tensor:
        return self.project(grad.float(), targets=False).to(grad.dtype)

    def enforce(self) -> None:
        write_param(self.param, self.project(read_param(self.param)))

    def follow_sharding(self) -> bool:
        """Re-bind to the DTensor that FSDP2's `fully_shard` put in place of `param`; True if it did."""
        current = self.owner.weight
        if current is self.param or not is_row_sharded(current):
            return False
        self.shards = RowShards.of(current)
        rows, device = self.shards.rows, current.to_local().device
        self.param = current
        self.input_basis = None if self.input_basis is None else self.input_basis.to(device)
        # clones: a view would keep the whole V and R alive on every rank
        self.output_basis = None if self.output_basis is None else self.output_basis[rows].to(device).clone()
        self.input_target = None if self.input_target is None else self.input_target[rows].to(device).clone()
        self.output_target = None if self.output_target is None else self.output_target.to(device)
        return True


@dataclass
class _FactorStack:
    """LoRA factors of one shape and dtype, projected with one batched product.

    A LoRA model has hundreds of small factors in a handful of shapes. One by one, each costs a
    Python iteration and ~23 ops (on a GPU, host time and kernel launches), more than its tiny
    products; stacked, each shape costs a few (benchmarks/enforce.py). The members' bases are
    views of the stacked ones, so bases are held once.
    """

    members: list[ProtectedTensor]
    input_basis: Tensor | None  # n x d_in x k
    output_basis: Tensor | None  # n x d_out x k

    @classmethod
    def of(cls, members: list[ProtectedTensor]) -> _FactorStack:
        def stacked(side: str) -> Tensor | None:
            if getattr(members[0], side) is None:
                return None
            bases = torch.stack([getattr(member, side) for member in members])
            for member, basis in zip(members, bases.unbind(0)):
                setattr(member, side, basis)
            return bases

        return cls(members, stacked("input_basis"), stacked("output_basis"))

    @torch.no_grad()
    def enforce(self) -> None:
        params = [member.param for member in self.members]
        if _managed_by_deepspeed(params[0]):
            for member in self.members:
                member.enforce()
            return
        shards = self.members[0].shards
        locals_ = [p.to_local() for p in params] if shards is not None else params
        x = torch.stack(locals_).float()
        # project_input_side/project_output_side, fused in place: unfused, the stacked tensors are
        # memory-bound and were no faster than the per-factor loop on a CPU (benchmarks/README.md).
        if self.input_basis is not None:
            x.baddbmm_(x @ self.input_basis, self.input_basis.mT, alpha=-1)  # x - (x U) U^T
        if self.output_basis is not None:
            residual = self.output_basis.mT @ x
            if shards is not None:  # one all-reduce for the whole stack
                shards.sum(residual)
            x.baddbmm_(self.output_basis, residual, alpha=-1)  # x - V (V^T x)
        torch._foreach_copy_(locals_, list(x.unbind(0)))


def _stack_factors(factors: list[ProtectedTensor]) -> list[_FactorStack]:
    groups: dict[tuple, list[ProtectedTensor]] = defaultdict(list)
    for factor in factors:
        bases = (factor.input_basis, factor.output_basis)
        # the global shape (a DTensor's): every rank must form the same stacks, in the same order,
        # for the stacks' all-reduces to match up
        key = (factor.param.shape, factor.param.dtype, factor.param.device, *(b if b is None else b.shape for b in bases))
        groups[key].append(factor)
    return [_FactorStack.of(members) for members in groups.values()]


SKETCH_COLUMNS = 32


@dataclass
class _FullModule:
    """Full fine-tuning: the weight itself is trained.

    The leakage metric needs ||W - W0||_F, and keeping W0 would double the weights' memory. A
    Gaussian sketch G (d_in x 32, shared by modules of the same width) with W0 G kept instead gives
    E ||(W - W0) G||^2 / 32 = ||W - W0||^2: relative error sqrt(2/32) at worst (a rank-1 update),
    far less for a real update and over many modules; memory O(d_out 32) per module.
    """

    weight: ProtectedTensor
    sketch: Tensor | None = None
    initial_sketched: Tensor | None = None

    def update_sq(self, weight: Tensor) -> Tensor:
        return (weight @ self.sketch - self.initial_sketched).square().sum() / self.sketch.shape[1]


@dataclass
class _LoraModule:
    """LoRA/QLoRA: dW = scaling * B @ A, for each active adapter."""

    factors: list[tuple[ProtectedTensor, ProtectedTensor, float]]  # (A, B, scaling)


@dataclass
class LeakageReport:
    """Sums of squared Frobenius norms over protected modules, and their ratios."""

    update_sq: float = 0.0
    input_leak_sq: float = 0.0
    output_leak_sq: float = 0.0
    per_module: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, update_sq: float, input_sq: float, output_sq: float) -> None:
        input_sq, output_sq = max(input_sq, 0.0), max(output_sq, 0.0)  # trace forms can round below 0
        self.update_sq += update_sq
        self.input_leak_sq += input_sq
        self.output_leak_sq += output_sq
        self.per_module[name] = math.sqrt((input_sq + output_sq) / update_sq) if update_sq > 0 else 0.0

    @property
    def input_leakage(self) -> float:
        return math.sqrt(self.input_leak_sq / self.update_sq) if self.update_sq > 0 else 0.0

    @property
    def output_leakage(self) -> float:
        return math.sqrt(self.output_leak_sq / self.update_sq) if self.update_sq > 0 else 0.0


class WeightConstraint:
    """Keeps every trainable update of the protected modules out of the safety subspace.

    Build it before the optimizer exists (so R = W0 U and the LoRA A projection are taken from
    the initial weights, also when training later resumes from a checkpoint), call `attach()`
    once, then `enforce()` after every optimizer step in update mode.
    """

    def __init__(
        self,
        model: nn.Module,
        subspace: Subspace,
        mode: str = "update",
        log_leakage: bool = True,
        allow_partial: bool = False,
        allow_precision_mismatch: bool = False,
    ):
        if mode not in ("update", "gradient"):
            raise ValueError(f"cwac.projection must be 'update' or 'gradient', got {mode!r}")
        self.mode = mode
        self.subspace_path = subspace.path
        self._hooks: list = []
        self._full: dict[str, _FullModule] = {}
        self._sketches: dict[tuple[int, torch.device], Tensor] = {}
        self._lora: dict[str, _LoraModule] = {}
        self.frozen_modules: list[str] = []

        modules = resolve_modules(base_model_of(model), subspace.module_names, source=subspace.path)
        subspace.check_shapes(modules)
        self.precision_mismatch = check_precision_matches(subspace, modules, allow_precision_mismatch)
        for name, module in modules.items():
            device = self._device_of(module)
            input_basis = subspace.input_basis(name, device)
            output_basis = subspace.output_basis(name, device)
            if is_lora_wrapper(module):
                self._bind_lora(name, module, input_basis, output_basis)
            elif module.weight.requires_grad:
                self._bind_full(name, module, input_basis, output_basis, log_leakage)
            else:
                self.frozen_modules.append(name)
        # The tensors an optimizer step may move out of the subspace: trained, with a basis to keep.
        trained_factors = [
            t
            for lora in self._lora.values()
            for lora_a, lora_b, _ in lora.factors
            for t in (lora_a, lora_b)
            if t.param.requires_grad and (t.input_basis is not None or t.output_basis is not None)
        ]
        self.tensors: list[ProtectedTensor] = [m.weight for m in self._full.values()] + trained_factors
        self._trained_factors = trained_factors
        self._factor_stacks = _stack_factors(trained_factors)
        if not self.tensors:
            raise SubspaceError(
                f"none of the {len(modules)} modules in {subspace.path} is trained: with LoRA, "
                "lora_target_modules must include some of cwac.target_modules (or use "
                "lora_target_linear: true); with full fine-tuning, unfreeze them"
            )
        # Both factors of a protected LoRA module count as protected: V^T B = 0 is only needed
        # with an output basis, yet dW = s B A is constrained through A alone.
        self.protected_params = [m.weight.param for m in self._full.values()] + [
            t.param for lora in self._lora.values() for a, b, _ in lora.factors for t in (a, b)
        ]
        self.coverage = coverage_of(model, self.protected_params)
        self.coverage.check(allow_partial)

    @staticmethod
    def _device_of(module: nn.Module) -> torch.device:
        weight = linear_of(module).weight
        return weight.device if weight.device.type != "meta" else torch.device("cpu")

    def _bind_lora(self, name: str, module: nn.Module, input_basis: Tensor | None, output_basis: Tensor | None):
        if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
            raise SubspaceError(
                f"{name}: DoRA (peft_use_dora) changes the weight through a magnitude vector that "
                "CWAC cannot project; set peft_use_dora: false (plain LoRA)"
            )
        factors = []
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            lora_a = module.lora_A[adapter].weight
            lora_b = module.lora_B[adapter].weight
            if not (lora_a.requires_grad or lora_b.requires_grad):
                continue
            if read_model_param(lora_b).count_nonzero():
                # dW = s (B A - B0 A0): projecting A0 would remove the protected part of the
                # effective weight before the first step, and the metric on s B A could not see it.
                raise SubspaceError(
                    f"{name}: adapter {adapter!r} does not start at zero (B != 0), as after PiSSA, OLoRA, "
                    "CorDA, EVA or LoftQ initialisation (peft_init_lora_weights, peft.loftq_config) or a "
                    "trained adapter (lora_model_dir); CWAC constrains updates from B A = 0. Use PEFT's "
                    "default init; for a trained adapter, merge it into the base first (`axolotl merge-lora`), "
                    "point base_model at the merged model, rerun `cwac subspace` and train a fresh adapter"
                )
            # A U = 0 and V^T B = 0 suffice for dW = s B A; the metric needs both factors.
            factors.append(
                (
                    ProtectedTensor(name, lora_a, module.lora_A[adapter], input_basis=input_basis),
                    ProtectedTensor(name, lora_b, module.lora_B[adapter], output_basis=output_basis),
                    float(module.scaling[adapter]),
                )
            )
        if factors:
            self._lora[name] = _LoraModule(factors)
        else:
            self.frozen_modules.append(name)

    def _bind_full(self, name, module, input_basis, output_basis, log_leakage: bool):
        weight = read_param(module.weight)
        protected = ProtectedTensor(
            name,
            module.weight,
            linear_of(module),
            input_basis=input_basis,
            output_basis=output_basis,
            input_target=weight @ input_basis if input_basis is not None else None,
            output_target=output_basis.T @ weight if output_basis is not None else None,
        )
        full = _FullModule(protected)
        if log_leakage:
            key = (weight.shape[1], weight.device)
            if key not in self._sketches:
                generator = torch.Generator().manual_seed(weight.shape[1])
                self._sketches[key] = torch.randn(weight.shape[1], SKETCH_COLUMNS, generator=generator).to(weight.device)
            full.sketch = self._sketches[key]
            full.initial_sketched = weight @ full.sketch
        self._full[name] = full

    @property
    def module_names(self) -> list[str]:
        return [*self._full, *self._lora]

    def follow_sharding(self) -> None:
        """Re-bind to the DTensors that FSDP2 put in place of the parameters at `accelerator.prepare`.

        Everything else was taken before, from the whole weights (R = W0 U, Q = V^T W0, the sketch of
        W0), so a resumed run still measures from W0; each tensor keeps its rows of them.
        """
        for lora in self._lora.values():
            for lora_a, lora_b, _ in lora.factors:
                lora_a.follow_sharding()
                lora_b.follow_sharding()
        for full in self._full.values():
            if full.weight.follow_sharding() and full.sketch is not None:
                device = full.weight.param.to_local().device
                full.sketch = self._sketches.setdefault((full.sketch.shape[0], device), full.sketch.to(device))
                full.initial_sketched = full.initial_sketched[full.weight.shards.rows].to(device).clone()
        if len({t.shards is None for t in self.tensors}) > 1:
            unsharded = next(t.module_name for t in self.tensors if t.shards is None)
            raise SubspaceError(
                f"{unsharded}: FSDP2 sharded some protected parameters and not this one (fsdp_config.ignored_modules?); "
                "the constraint follows all of them sharded or none. Shard every protected module"
            )
        self._factor_stacks = _stack_factors(self._trained_factors)

    def check_bound(self, model: nn.Module, optimizer=None) -> None:
        """Refuse to train if the tensors bound at construction are no longer the ones trained.

        A wrapper that swaps parameters after the constraint was built, other than FSDP2 (see
        `follow_sharding`), would leave it projecting tensors nobody uses while the log reads zero
        leakage.
        """
        current = {id(p) for p in base_model_of(model).parameters()}
        stepped = None
        # DeepSpeed's optimizer steps flat fp32 partitions, not the model's tensors
        if optimizer is not None and not _managed_by_deepspeed(self.tensors[0].param):
            stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for tensor in self.tensors:
            if id(tensor.param) not in current or (stepped is not None and id(tensor.param) not in stepped):
                raise SubspaceError(
                    f"{tensor.module_name}: the parameter the weight constraint was bound to is no longer "
                    f"the one {'the model holds' if id(tensor.param) not in current else 'the optimizer steps'} "
                    "(a wrapper replaced it after the trainer was built), so the constraint would do "
                    "nothing. Train without that wrapper (DeepSpeed ZeRO and FSDP2 are supported)"
                )

    def attach(self) -> None:
        """Project the starting point (LoRA's random A) and, in gradient mode, hook the gradients."""
        for stack in self._factor_stacks:
            stack.enforce()
        if self.mode == "gradient" and not self.sharded:
            for tensor in self.tensors:
                self._hooks.append(tensor.param.register_hook(tensor.project_gradient))

    @property
    def sharded(self) -> bool:
        return self.tensors[0].shards is not None

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Gradient mode under FSDP2, before each optimizer step.

        Autograd runs on the gathered parameters and FSDP2 writes the reduced rows into the shards'
        `.grad`, which no tensor hook sees; so the rows are projected where the optimizer reads them.
        """
        if self.mode != "gradient" or not self.sharded:
            return
        for tensor in self.tensors:  # FSDP2 gives a gradient on every rank or none: the all-reduces match
            if tensor.param.grad is not None:
                local = tensor.param.grad.to_local()
                local.copy_(tensor.project_gradient(local))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @torch.no_grad()
    def enforce(self) -> None:
        """Re-impose the constraint on the current weights (update mode, after each step)."""
        for stack in self._factor_stacks:
            stack.enforce()
        for full in self._full.values():
            full.weight.enforce()

    @torch.no_grad()
    def leakage(self) -> LeakageReport:
        """||dW U||_F / ||dW||_F (and ||V^T dW||_F / ||dW||_F), summed over protected modules.

        Measured on the weights the forward runs and a save writes: under DeepSpeed with bf16 those
        are the bf16 copies of its fp32 master, which the projection keeps exact, and they leak by
        their rounding. Exact for LoRA; under full fine-tuning ||dW||_F comes from the sketch (see
        `_FullModule`).
        """
        report = LeakageReport()
        for name, full in self._full.items():
            if full.sketch is None:
                continue
            tensor = full.weight
            weight = tensor.read_run()  # under FSDP2 a sum over rows adds up over ranks
            zero = weight.new_zeros(())
            input_sq = zero
            if tensor.input_basis is not None:
                input_sq = (weight @ tensor.input_basis - tensor.input_target).square().sum()
            update_sq, input_sq = tensor.sum_rows(torch.stack([full.update_sq(weight), input_sq])).tolist()
            output_sq = zero
            if tensor.output_basis is not None:
                output_sq = (tensor.sum_rows(tensor.output_basis.T @ weight) - tensor.output_target).square().sum()
            report.add(name, update_sq, input_sq, output_sq.item())
        for name, lora in self._lora.items():
            update_sq = input_sq = output_sq = 0.0
            for lora_a, lora_b, scaling in lora.factors:
                a = read_model_param(lora_a.param)  # r x d_in: gathered whole under FSDP2, it is small
                b = lora_b.read_run()
                # ||s B A X||_F^2 = s^2 tr((B^T B)(A X)(A X)^T): r x r work instead of d_out x d_in.
                btb = lora_b.sum_rows(b.T @ b)
                update_sq += scaling**2 * torch.trace(btb @ (a @ a.T)).item()
                if lora_a.input_basis is not None:
                    au = a @ lora_a.input_basis
                    input_sq += scaling**2 * torch.trace(btb @ (au @ au.T)).item()
                if lora_b.output_basis is not None:
                    vb = lora_b.sum_rows(lora_b.output_basis.T @ b)
                    output_sq += scaling**2 * torch.trace((vb.T @ vb) @ (a @ a.T)).item()
            report.add(name, update_sq, input_sq, output_sq)
        return report

