"""The safety subspace: computing it on the aligned model, and its safetensors file.

File format (read by others, so kept plain): one safetensors file, one entry per protected
module keyed by its name in the base model (`model.layers.3.self_attn.q_proj`):
`<name>.input_basis` (d_in x k, orthonormal columns) and optionally `<name>.output_basis`
(d_out x k'), float32. String metadata: format, model, model_type, hidden_size,
num_hidden_layers, method, rank, energy, output_rank, target_modules, layers and the data it was
computed on.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cwac_plugin import ranks
from cwac_plugin.config import CWACConfig
from cwac_plugin.data import Batches, Example, load_examples
from cwac_plugin.errors import SubspaceError
from cwac_plugin.models import (
    accepts_logits_to_keep,
    base_model_of,
    dense_weight,
    find_target_modules,
    linear_of,
    model_metadata,
    module_dims,
    resolve_modules,
)

FORMAT = "cwac-subspace/1"
ORTHONORMAL_TOL = 1e-4
SKETCH_OVERSAMPLING = 4


# ---------------------------------------------------------------------------------------------
# The subspace object and its file.
# ---------------------------------------------------------------------------------------------


@dataclass
class Subspace:
    input_bases: dict[str, Tensor]
    output_bases: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = "<in memory>"

    @property
    def module_names(self) -> list[str]:
        return sorted(set(self.input_bases) | set(self.output_bases))

    def input_basis(self, name: str, device: torch.device | str = "cpu") -> Tensor | None:
        basis = self.input_bases.get(name)
        return None if basis is None else basis.to(device=device, dtype=torch.float32)

    def output_basis(self, name: str, device: torch.device | str = "cpu") -> Tensor | None:
        basis = self.output_bases.get(name)
        return None if basis is None else basis.to(device=device, dtype=torch.float32)

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash leaves either the old file or none, never a partial one."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.input_basis": b.contiguous().float() for name, b in self.input_bases.items()}
        tensors |= {f"{name}.output_basis": b.contiguous().float() for name, b in self.output_bases.items()}
        metadata = {"format": FORMAT, **{k: str(v) for k, v in self.metadata.items()}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path, key: str = "cwac.subspace") -> Subspace:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise SubspaceError(
                f"{key}: {path} does not exist. Compute it first with `cwac subspace CONFIG.yml` "
                "(it writes the file named in cwac.subspace)"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except (SafetensorError, OSError) as err:
            raise SubspaceError(f"{key}: {path} is not a readable safetensors file ({err})") from err
        if metadata.get("format") != FORMAT:
            raise SubspaceError(
                f"{key}: {path} is not a CWAC subspace file (metadata format={metadata.get('format')!r}, "
                f"expected {FORMAT!r}); compute one with `cwac subspace`"
            )
        subspace = cls({}, {}, metadata, str(path))
        for name, tensor in tensors.items():
            module, _, kind = name.rpartition(".")
            if kind == "input_basis":
                subspace.input_bases[module] = tensor
            elif kind == "output_basis":
                subspace.output_bases[module] = tensor
            else:
                raise SubspaceError(f"{key}: {path} has an unexpected entry {name!r}")
        if not subspace.module_names:
            raise SubspaceError(f"{key}: {path} protects no module")
        for name, basis in [*subspace.input_bases.items(), *subspace.output_bases.items()]:
            _check_orthonormal(basis, f"{key}: {path}, {name}")
        return subspace

    def check_shapes(self, modules: dict[str, nn.Module]) -> None:
        """Each basis must span the module's input (or output) space: catches another model's file."""
        for name, module in modules.items():
            d_out, d_in = module_dims(module)
            for side, basis, dim in (("input", self.input_bases.get(name), d_in), ("output", self.output_bases.get(name), d_out)):
                if basis is not None and basis.shape[0] != dim:
                    raise SubspaceError(
                        f"{self.path}: {name}.{side}_basis has {basis.shape[0]} rows but the module's "
                        f"{side} dimension is {dim}: the subspace was computed for another model "
                        f"({self.metadata.get('model', 'unknown')}). Rerun `cwac subspace` on this model"
                    )


def _check_orthonormal(basis: Tensor, where: str) -> None:
    if basis.ndim != 2 or basis.shape[1] > basis.shape[0]:
        raise SubspaceError(f"{where}: a basis must be a d x k matrix with k <= d, got {tuple(basis.shape)}")
    gram = basis.double().T @ basis.double()
    error = (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max().item()
    if error > ORTHONORMAL_TOL:
        raise SubspaceError(f"{where}: basis columns are not orthonormal (max |U^T U - I| = {error:.2e})")


# ---------------------------------------------------------------------------------------------
# From second moments (or a weight delta) to bases.
# ---------------------------------------------------------------------------------------------


def choose_rank(eigenvalues: Tensor, rank: int | None, energy: float | None) -> int:
    """k from a descending spectrum: fixed `rank`, or the smallest k holding `energy` of it.

    Only positive eigenvalues count: the contrastive moment C_s - beta C_b is indefinite and its
    negative directions are the ones benign data uses more than safety data.
    """
    positive = eigenvalues.clamp(min=0)
    available = int((positive > 0).sum().item())
    k = available if rank is None else min(rank, available)
    if energy is not None and available:
        fraction = positive.cumsum(0) / positive.sum()
        k = min(k, int((fraction < energy - 1e-12).sum().item()) + 1)
    return max(k, 1)


def top_eigenvectors(moment: Tensor, rank: int | None, energy: float | None) -> Tensor:
    """Orthonormal columns spanning the top of a symmetric matrix's spectrum (float64 solve).

    A fixed rank well below the width needs only the top of the spectrum: Lanczos (scipy's ARPACK,
    seeded start) finds it in O(n^2 k) per iteration where a full eigh costs O(n^3), the part of
    `cwac subspace` that grows fastest with width (benchmarks/README.md). `energy` needs the whole
    spectrum, hence eigh.
    """
    matrix = moment.double().cpu()
    n = matrix.shape[0]
    top = None
    if energy is None and rank is not None and 3 * rank < n:
        top = _lanczos_top(matrix, rank)
    if top is None:
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        top = eigenvalues.flip(0), eigenvectors.flip(1)
    eigenvalues, eigenvectors = top
    k = choose_rank(eigenvalues, rank, energy)
    return eigenvectors[:, :k].float().contiguous()


def top_directions(moment: Tensor, rank: int | None, energy: float | None) -> Tensor:
    """The top eigenvectors of a d x d moment, or of the matrix a d x c sketch stands for."""
    if moment.shape[0] == moment.shape[1]:
        return canonical_signs(top_eigenvectors(moment, rank, energy))
    return canonical_signs(_sketch_top(moment, rank))


def canonical_signs(basis: Tensor) -> Tensor:
    """Each column with its largest-magnitude entry positive. An eigenvector's sign is arbitrary and
    solvers settle it by rounding, which varies with memory layout: without this, the same data
    gave files that differed in the signs of a few columns."""
    largest = basis.gather(0, basis.abs().argmax(0, keepdim=True))
    return basis * torch.where(largest < 0, -1.0, 1.0)


def _sketch_top(sketch: Tensor, rank: int) -> Tensor:
    """Top eigenvectors of a symmetric M (indefinite allowed) from Y = M @ test alone.

    Single-pass (Halko et al. 2011, sec. 5.5): Q spans Y, and B ~ Q^T M Q solves
    B (Q^T test) = Q^T Y in least squares; B's top eigenvectors, lifted by Q, approximate M's.
    """
    y = sketch.double().cpu()
    test = sketch_test_matrix(*y.shape).double()
    q, _ = torch.linalg.qr(y)
    b = torch.linalg.lstsq((q.T @ test).T, (q.T @ y).T).solution.T
    eigenvalues, eigenvectors = torch.linalg.eigh((b + b.T) / 2)
    k = choose_rank(eigenvalues.flip(0), rank, None)
    return (q @ eigenvectors.flip(1)[:, :k]).float().contiguous()


def _lanczos_top(matrix: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The k algebraically largest eigenpairs, descending; None if ARPACK does not converge."""
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    start = np.random.default_rng(0).standard_normal(matrix.shape[0])
    try:
        values, vectors = eigsh(matrix.numpy(), k=k, which="LA", v0=start)
    except ArpackNoConvergence:
        return None
    order = np.argsort(values)[::-1]
    return torch.from_numpy(values[order].copy()), torch.from_numpy(vectors[:, order].copy())


def check_rank_fits(modules: dict[str, nn.Module], rank: int | None, output_rank: int) -> None:
    for name, module in modules.items():
        d_out, d_in = module_dims(module)
        if rank is not None and rank > d_in:
            raise SubspaceError(
                f"cwac.rank = {rank} exceeds the input dimension {d_in} of {name}; lower cwac.rank "
                "(or use cwac.energy)"
            )
        if output_rank > d_out:
            raise SubspaceError(
                f"cwac.output_rank = {output_rank} exceeds the output dimension {d_out} of {name}; "
                "lower cwac.output_rank"
            )


# ---------------------------------------------------------------------------------------------
# Streaming statistics over a data set, accumulated in float32 on the model's device.
# ---------------------------------------------------------------------------------------------


def _real_tokens(hidden: Tensor, mask: Tensor) -> Tensor:
    """The float32 rows of a (batch, seq, d) tensor at the non-padding positions of the flat `mask`."""
    return hidden.detach().reshape(-1, hidden.shape[-1])[mask].float()


class _MomentAccumulator:
    """Sums x^T x of each module's input over non-padding tokens, from forward hooks.

    q/k/v (and gate/up) read the same input tensor one after another: its product is computed
    once and added to each, which halves the cost on Llama blocks.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums: dict[str, Tensor] = {}
        self.tokens = 0
        self.mask: Tensor | None = None
        self.weight = 1.0  # 0 for a rank's repeat of a batch (ranks.my_share)
        self._last: tuple[Tensor, Tensor] | None = None  # (input tensor, its x^T x)
        self._handles = [linear_of(m).register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_module, args, _output):
            x = args[0]
            if self._last is None or self._last[0] is not x:
                flat = _real_tokens(x, self.mask)
                self._last = (x, self.weight * (flat.T @ flat))
            if name in self.sums:
                self.sums[name] += self._last[1]
            else:
                self.sums[name] = self._last[1].clone()

        return hook

    def start_batch(self, attention_mask: Tensor, weight: float) -> None:
        self.mask = attention_mask.reshape(-1).bool()
        self.tokens += int(weight * self.mask.sum())
        self.weight = weight
        self._last = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def activation_moments(
    model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[dict[str, Tensor]], desc: str
) -> tuple[dict[str, Tensor], int]:
    """E[x x^T] of each module's inputs over the non-padding tokens of `batches` (of every rank's share)."""
    accumulator = _MomentAccumulator(modules)
    try:
        for _, batch, weight in ranks.progress(batches, f"{desc} activations"):
            accumulator.start_batch(batch["attention_mask"], weight)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        accumulator.remove()
    (tokens,) = ranks.sum_over_ranks(accumulator.sums, accumulator.tokens)
    n = max(tokens, 1)
    return {k: v / n for k, v in accumulator.sums.items()}, tokens


@torch.no_grad()
def output_moments(modules: dict[str, nn.Module], input_moments: dict[str, Tensor]) -> dict[str, Tensor]:
    """E[y y^T] = W E[x x^T] W^T of the bias-free part of each output: the directions the module
    writes on safety inputs, from the input statistics alone (no d_out x d_out sum per batch)."""
    out = {}
    for name, moment in input_moments.items():
        weight = dense_weight(modules[name]).to(moment.device)
        out[name] = weight @ moment @ weight.T
    return out


def sketch_columns(d: int, rank: int | None, energy: float | None) -> int | None:
    """Width of the sketch that stands in for a d x d moment, or None to keep the moment whole.

    A fixed rank needs only the top of the spectrum, which a randomized sketch M @ test with
    SKETCH_OVERSAMPLING * rank columns captures (Halko, Martinsson & Tropp 2011, sec. 5.5): memory
    d x 4k instead of d^2 (gigabytes per module at 8B widths) and per batch O(tokens d k) instead
    of O(d^2 d_other). On SmolLM2 its bases overlap the exact ones by 0.97 on average, closer than
    bases from two halves of the data are to each other (benchmarks/README.md). `energy` needs the
    whole spectrum.
    """
    if rank is None or energy is not None:
        return None
    columns = SKETCH_OVERSAMPLING * rank
    return columns if 2 * columns <= d else None


def sketch_test_matrix(d: int, columns: int) -> Tensor:
    """The fixed Gaussian test matrix of a d-wide sketch: the same for safety and contrast data,
    so their sketches subtract, and rebuilt for the solve (seeded, on the CPU, then moved)."""
    return torch.randn(d, columns, generator=torch.Generator().manual_seed(d))


def _gram(p: Tensor, q: Tensor, test: Tensor | None) -> Tensor:
    """P^T Q Q^T P for token-major P (T x d) and Q (T x e), or its product with `test`,
    evaluated right to left so that the d x e matrix Q^T P is never formed."""
    if test is None:
        product = q.T @ p
        return product.T @ product
    return p.T @ (q @ (q.T @ (p @ test)))


def response_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's mean next-token loss on the response tokens of `batch`, with logits only at
    the positions that predict one (the union over rows).

    Prompt positions carry no loss, so their vocabulary-wide logits only cost time: on the
    SmolLM2 safety and contrast sets they are 3/4 of the tokens, and the LM head with its
    softmax is a fifth of the model's forward and backward. `logits_to_keep` lets the model
    apply its own head (soft-capping and scaling included); a model without it computes all
    logits and the same positions are picked from them.
    """
    targets = batch["labels"][:, 1:]
    positions = (targets != -100).any(dim=0).nonzero().flatten()
    selective = accepts_logits_to_keep(model)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        **({"logits_to_keep": positions} if selective else {}),
    ).logits
    if not selective:
        logits = logits[:, positions]
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[:, positions].flatten(), ignore_index=-100)


def gradient_moments(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, Tensor]],
    desc: str,
    rank: int | None = None,
    energy: float | None = None,
    output_rank: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """Means over batches of G^T G (and of G G^T when output_rank), G a module's refusal-loss
    weight gradient; each is d x d, or its sketch (d x sketch_columns) where sketch_columns allows.

    G = g^T x comes from the module's input x and output gradient g, so no weight needs a
    gradient: the same code serves a 4-bit model, and the backward pass skips every weight
    gradient. The top singular directions of G are the ones gradient projection memory protects.
    """
    grads_in: dict[str, Tensor] = {}
    grads_out: dict[str, Tensor] = {}
    # (module input, its float32 copy over real tokens), held for the backward; q/k/v and
    # gate/up read the same input tensor and share one copy
    last_input: list[Tensor | None] = [None, None]
    test_matrices: dict[tuple[int, int], Tensor] = {}
    mask: Tensor | None = None
    weight = 1.0  # 0 for a rank's repeat of a batch (ranks.my_share)
    tokens = n_batches = 0

    def test_matrix(d: int, columns: int | None, device: torch.device) -> Tensor | None:
        if columns is None:
            return None
        if (d, columns) not in test_matrices:
            test_matrices[d, columns] = sketch_test_matrix(d, columns).to(device)
        return test_matrices[d, columns]

    def accumulate(store: dict[str, Tensor], name: str, value: Tensor) -> None:
        if name in store:
            store[name] += weight * value
        else:
            store[name] = weight * value

    def make_hook(name: str):
        d_out, d_in = module_dims(modules[name])
        columns_in = sketch_columns(d_in, rank, energy)
        columns_out = sketch_columns(d_out, output_rank, None)

        def hook(_module, args, output):
            if last_input[0] is not args[0]:
                last_input[:] = args[0], _real_tokens(args[0], mask)
            x = last_input[1]

            def on_grad(grad):
                g = _real_tokens(grad, mask)
                accumulate(grads_in, name, _gram(x, g, test_matrix(d_in, columns_in, x.device)))
                if output_rank:
                    accumulate(grads_out, name, _gram(g, x, test_matrix(d_out, columns_out, x.device)))

            output.register_hook(on_grad)

        return hook

    handles = [linear_of(m).register_forward_hook(make_hook(name)) for name, m in modules.items()]
    # The backward starts from the embeddings' output, made a leaf inside the model's own forward
    # (a sharded model's embedding weight is only whole there)
    as_leaf = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True))
    handles.append(as_leaf)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        for _, batch, weight in ranks.progress(batches, f"{desc} gradients"):
            mask = batch["attention_mask"].reshape(-1).bool()
            tokens += int(weight * mask.sum())
            n_batches += int(weight)
            response_loss(model, batch).backward()
            last_input[:] = None, None
    finally:
        for handle in handles:
            handle.remove()
        for parameter in trainable:
            parameter.requires_grad_(True)
    every_sum = grads_in | {f"{k} output": v for k, v in grads_out.items()}
    n_batches, tokens = ranks.sum_over_ranks(every_sum, n_batches, tokens)
    n = max(n_batches, 1)
    return {k: v / n for k, v in grads_in.items()}, {k: v / n for k, v in grads_out.items()}, tokens


def delta_bases(
    modules: dict[str, nn.Module],
    base_modules: dict[str, nn.Module],
    rank: int | None,
    energy: float | None,
    output_rank: int,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """SafeLoRA-style: top singular vectors of W_aligned - W_base."""
    inputs, outputs = {}, {}
    for name in tqdm(modules, desc="alignment deltas", unit="module"):
        delta = (dense_weight(modules[name]).cpu() - dense_weight(base_modules[name]).cpu()).double()
        left, singular, right_t = torch.linalg.svd(delta, full_matrices=False)
        spectrum = singular.square()
        k = choose_rank(spectrum, rank, energy)
        inputs[name] = canonical_signs(right_t[:k].T.float().contiguous())
        if output_rank:
            outputs[name] = canonical_signs(left[:, : choose_rank(spectrum, output_rank, None)].float().contiguous())
    return inputs, outputs


def bases_from_moments(
    moments_in: dict[str, Tensor],
    moments_out: dict[str, Tensor],
    rank: int | None,
    energy: float | None,
    output_rank: int,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    inputs = {
        name: top_directions(m, rank, energy) for name, m in tqdm(moments_in.items(), desc="eigenbases", unit="module")
    }
    outputs = {name: top_directions(m, output_rank, None) for name, m in moments_out.items()} if output_rank else {}
    return inputs, outputs


def weights_precision(modules: dict[str, nn.Module]) -> str:
    """How the protected base weights are stored: `bnb-4bit`, `bnb-8bit` or their torch dtype.

    The subspace is a statistic of the model it was computed on; a 4-bit model's gradients are
    not a bf16 model's, so a file from one is stale for the other.
    """
    weight = linear_of(next(iter(modules.values()))).weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        return "bnb-4bit"
    if kind == "Int8Params":
        return "bnb-8bit"
    return str(weight.dtype).removeprefix("torch.")


def check_precision_matches(subspace: Subspace, modules: dict[str, nn.Module], allow_mismatch: bool) -> str | None:
    """None when the file was computed at this precision; else a description of the mismatch, if
    `allow_mismatch` (cwac.allow_precision_mismatch) lets it through."""
    stored, current = subspace.metadata.get("weights"), weights_precision(modules)
    if stored is None or stored == current:
        return None
    mismatch = f"{subspace.path} was computed on {stored} weights, this model's are {current}"
    if not allow_mismatch:
        raise SubspaceError(
            f"cwac.subspace: {mismatch}. Rerun `cwac subspace` with the training config (same load_in_4bit "
            "/ bf16 settings), or set cwac.allow_precision_mismatch: true if the model is too large to load "
            "for precompute at the training precision"
        )
    return mismatch


def check_model_matches(subspace: Subspace, model: nn.Module) -> None:
    """Architecture fields must agree; a different path to the same architecture is fine."""
    current = model_metadata(model)
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        stored = subspace.metadata.get(key)
        if stored and current[key] and stored != current[key]:
            raise SubspaceError(
                f"cwac.subspace: {subspace.path} was computed for {subspace.metadata.get('model')!r} "
                f"({key}={stored}) but this model has {key}={current[key]}. Rerun `cwac subspace` on "
                "this model"
            )


def recorded_settings(cfg: CWACConfig) -> dict[str, tuple[str, object]]:
    """metadata key -> (cwac key, value): the settings a subspace file records, so that training can
    tell a file computed from this block from a stale one."""
    return {
        "method": ("subspace_method", cfg.subspace_method),
        "rank": ("rank", cfg.rank),
        "energy": ("energy", cfg.energy),
        "output_rank": ("output_rank", cfg.output_rank),
        "target_modules": ("target_modules", ",".join(cfg.target_modules)),
        "layers": ("layers", cfg.layers),
    }


def check_settings_match(subspace: Subspace, cfg: CWACConfig) -> None:
    """A file computed under other `cwac` settings is stale (the block was edited after `cwac subspace`
    ran): training with it would silently protect other directions than the block describes."""
    for stored_key, (key, value) in recorded_settings(cfg).items():
        stored = subspace.metadata.get(stored_key)
        if stored is not None and str(stored) != str(value):
            raise SubspaceError(
                f"cwac.subspace: {subspace.path} was computed with {key}={stored} but cwac.{key} is {value}. "
                f"Rerun `cwac subspace CONFIG.yml`, or set cwac.{key} to {stored} to train with this file"
            )


def describe(subspace: Subspace) -> str:
    ranks = sorted({b.shape[1] for b in subspace.input_bases.values()})
    return json.dumps(
        {
            "modules": len(subspace.module_names),
            "input_ranks": [ranks[0], ranks[-1]] if ranks else [],
            "output_bases": len(subspace.output_bases),
            **{k: subspace.metadata.get(k) for k in ("model", "method")},
        }
    )


@dataclass
class SubspaceData:
    """The prompt sets a subspace is computed from, read before any model is loaded."""

    safety: list[Example]
    contrast: list[Example] | None = None

    @classmethod
    def load(cls, cfg: CWACConfig) -> SubspaceData | None:
        """None for the delta method, which needs weights, not data."""
        if cfg.subspace_method == "delta":
            return None
        if not cfg.safety_data:
            raise SubspaceError(f"cwac.safety_data is required by cwac.subspace_method {cfg.subspace_method!r}")
        safety = load_examples(cfg.safety_data, "cwac.safety_data", cfg.max_examples)
        contrast = load_examples(cfg.contrast_data, "cwac.contrast_data", cfg.max_examples) if cfg.contrast_data else None
        return cls(safety, contrast)


def compute_subspace(
    model: nn.Module, tokenizer, cfg: CWACConfig, max_length: int, data: SubspaceData | None = None
) -> Subspace | None:
    """Compute the safety subspace of the aligned `model` as the `cwac` block describes.

    In a torchrun job every rank measures its share of the data and the first rank alone solves
    for the bases: the others return None.
    """
    solve = measure_subspace(model, tokenizer, cfg, max_length, data)
    return None if solve is None else solve()


def measure_subspace(
    model: nn.Module, tokenizer, cfg: CWACConfig, max_length: int, data: SubspaceData | None = None
) -> Callable[[], Subspace] | None:
    """Every forward and collective of the subspace; returns the solve, which involves no other rank
    (None on the ranks but the first), so that a job with more forwards to run (`cwac prepare`) runs
    them first and no rank waits in a collective while the first one solves."""
    modules = find_target_modules(model, cfg.target_modules, cfg.layers)
    if not modules:
        linear_names = [n for n, m in base_model_of(model).named_modules() if isinstance(m, nn.Linear)][:4]
        raise SubspaceError(
            f"cwac.target_modules {cfg.target_modules} (layers {cfg.layers}) match no linear module of "
            f"the model; its linear modules are named like {linear_names}"
        )
    check_rank_fits(modules, cfg.rank, cfg.output_rank)
    metadata = model_metadata(model) | {k: value for k, (_, value) in recorded_settings(cfg).items()}
    metadata["weights"] = weights_precision(modules)
    model.eval()
    if cfg.subspace_method == "delta":
        if ranks.world_size() > 1:
            raise SubspaceError(
                "cwac.subspace_method: delta compares two models' weights and runs no forward: run `cwac subspace` "
                "in one process (without torchrun)"
            )
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(cfg.delta_base_model, dtype=torch.float32)
        base_modules = resolve_modules(base, modules, source=f"cwac.delta_base_model {cfg.delta_base_model}")
        inputs, outputs = delta_bases(modules, base_modules, cfg.rank, cfg.energy, cfg.output_rank)
        metadata["delta_base_model"] = cfg.delta_base_model
        return lambda: Subspace(inputs, outputs, metadata)

    data = data or SubspaceData.load(cfg)
    device = next(model.parameters()).device

    def moments_of(key: str, examples: list[Example]):
        batches = Batches(tokenizer, examples, max_length, cfg.batch_size, device)
        if cfg.subspace_method == "activation":
            moments_in, tokens = activation_moments(model, modules, batches, desc=key)
            return moments_in, {}, tokens
        return gradient_moments(model, modules, batches, key, cfg.rank, cfg.energy, cfg.output_rank)

    moments_in, moments_out, tokens = moments_of("cwac.safety_data", data.safety)
    unseen = [name for name in modules if name not in moments_in]
    if unseen:
        # A forward that bypasses the module's own (e.g. Axolotl's fused LoRA kernels) leaves it
        # without statistics; a file without it would leave it unprotected.
        raise SubspaceError(
            f"cwac.target_modules: {len(unseen)} of {len(modules)} modules saw no tokens while computing "
            f"the subspace (e.g. {unseen[0]}): their forward was bypassed. If lora_qkv_kernel, "
            "lora_o_kernel or lora_mlp_kernel are on, `cwac subspace` turns them off; with another patch "
            "that replaces module forwards, disable it for precompute"
        )
    metadata |= {"safety_data": cfg.safety_data, "safety_examples": len(data.safety), "safety_tokens": tokens}
    if data.contrast:
        contrast_in, contrast_out, tokens = moments_of("cwac.contrast_data", data.contrast)
        moments_in = {k: v - cfg.contrast_beta * contrast_in[k] for k, v in moments_in.items()}
        moments_out = {k: v - cfg.contrast_beta * contrast_out[k] for k, v in moments_out.items()}
        metadata |= {
            "contrast_data": cfg.contrast_data,
            "contrast_beta": cfg.contrast_beta,
            "contrast_examples": len(data.contrast),
            "contrast_tokens": tokens,
        }
    if cfg.subspace_method == "activation" and cfg.output_rank:
        moments_out = output_moments(modules, moments_in)
    if not ranks.is_main_process():
        return None

    def solve() -> Subspace:
        inputs, outputs = bases_from_moments(moments_in, moments_out, cfg.rank, cfg.energy, cfg.output_rank)
        return Subspace(inputs, outputs, metadata)

    return solve
