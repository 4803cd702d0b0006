"""The activation constraint: safety-critical SAE features and the penalty on their drift.

SAEs are sae-lens SAEs (`SAE.load_from_disk`, `save_model`); sae_lens is imported lazily because
it pulls in transformer_lens. Hook points use TransformerLens names, mapped onto HF decoder layers:

    blocks.L.hook_resid_post  ->  output hidden states of decoder layer L (model.layers[L])
    blocks.L.hook_resid_pre   ->  input hidden states of decoder layer L
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cwac_plugin import ranks
from cwac_plugin.config import CWACConfig
from cwac_plugin.data import Batches, Example, load_examples, save_directory_atomically, write_json_atomically
from cwac_plugin.errors import SAEConfigError
from cwac_plugin.models import (
    accepts_logits_to_keep,
    base_model_of,
    base_model_peft,
    decoder_layers,
)
from cwac_plugin.parallel import sharded_parameters

FEATURES_FORMAT = "cwac-features/1"
_HOOK_POINT = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


# ---------------------------------------------------------------------------------------------
# Hook points on HF decoder layers.
# ---------------------------------------------------------------------------------------------


def parse_hook_point(hook_point: str, num_layers: int) -> tuple[int, str]:
    match = _HOOK_POINT.match(hook_point or "")
    if match is None:
        raise SAEConfigError(
            f"cwac.hook_point {hook_point!r} is not supported: use `blocks.L.hook_resid_post` (output of "
            "decoder layer L) or `blocks.L.hook_resid_pre` (its input)"
        )
    layer = int(match.group(1))
    if layer >= num_layers:
        raise SAEConfigError(f"cwac.hook_point {hook_point!r}: the model has decoder layers 0..{num_layers - 1}")
    return layer, match.group(2)


def default_hook_point(num_layers: int) -> str:
    """Where an SAE trained here reads when cwac.hook_point is unset: the output of the layer at 90% depth.

    A middle layer does not protect: the attack can move the refusal in later layers (30% of its gradient
    lies in SmolLM2's layers 16-29), which a penalty read at layer 15 cannot reach (benchmarks/README.md,
    "Where the penalty reads decides whether it protects"); at 90% depth it does.
    """
    return f"blocks.{int(0.9 * num_layers)}.hook_resid_post"


def with_default_hook_point(cfg: CWACConfig, model: nn.Module) -> CWACConfig:
    """`cfg` with cwac.hook_point filled in for an SAE trained on `model`. The artifacts' recipes keep
    the unset key: the default follows the model, which the recipes name already."""
    if cfg.hook_point:
        return cfg
    return cfg.model_copy(update={"hook_point": default_hook_point(len(decoder_layers(model)))})


class _ReachedHookPoint(Exception):
    """Ends a forward at the hook point: the later layers and the LM head are not needed."""


class ResidualTap:
    """Captures the residual stream at a hook point, only inside `capture()`.

    Capturing is opt-in per forward so that a gradient-checkpointing recompute (which runs the
    layer again during backward, outside `capture()`) never counts activations twice.
    """

    def __init__(self, model: nn.Module, hook_point: str):
        layers = decoder_layers(model)
        layer, side = parse_hook_point(hook_point, len(layers))
        self.hook_point = hook_point
        self.layer = layers[layer]
        self.captured: list[Tensor] = []
        self._active = False
        self._stop = False
        if side == "post":
            self._handle = self.layer.register_forward_hook(self._on_output)
        else:
            self._handle = self.layer.register_forward_pre_hook(self._on_input, with_kwargs=True)

    @property
    def can_stop_early(self) -> bool:
        """Stopping a forward half-way would leave ZeRO-3's gathered parameters and prefetch trace, or
        FSDP2's unsharded ones, behind. Asked at each forward: FSDP2 shards after the tap is built."""
        return not sharded_parameters(self.layer)

    def _on_output(self, _module, _args, output):
        if self._active:
            self._keep(output[0] if isinstance(output, tuple) else output)

    def _on_input(self, _module, args, kwargs):
        if self._active:
            self._keep(args[0] if args else kwargs["hidden_states"])

    def _keep(self, hidden: Tensor) -> None:
        self.captured.append(hidden)
        if self._stop:
            raise _ReachedHookPoint

    @contextmanager
    def capture(self, stop: bool = False) -> Iterator[list[Tensor]]:
        """Collect activations; with `stop`, end the forward there (see `run_and_capture`)."""
        self.captured = []
        self._active = True
        self._stop = stop and self.can_stop_early
        # A reentrant-checkpointed layer's output gets its grad_fn only once the layer returns, too
        # late for a forward that ends inside it; so the hooked layer runs such a forward unchecked.
        # The layers below stay checkpointed: keeping all their activations for the anchors would
        # cost ~0.4 MiB per token and layer at 8B widths (bf16), gigabytes for a few anchors.
        unchecked = self._stop and torch.is_grad_enabled() and getattr(self.layer, "gradient_checkpointing", False)
        if unchecked:
            self.layer.gradient_checkpointing = False
        try:
            yield self.captured
        except _ReachedHookPoint:
            pass
        finally:
            if unchecked:
                self.layer.gradient_checkpointing = True
            self._active = self._stop = False

    def remove(self) -> None:
        self._handle.remove()


def run_and_capture(model: nn.Module, tap: ResidualTap, inputs: dict[str, Tensor]) -> Tensor:
    """The activations at the hook point; the forward stops there wherever it safely can.

    Where it cannot (ZeRO-3), it runs to the end, and its logits are never read: the LM head then
    runs on one position (on SmolLM2 the head is a fifth of the multiply-adds of a forward).
    """
    only_last_logits = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    with tap.capture(stop=True) as captured:
        model(**{key: value for key, value in inputs.items() if key != "labels"}, **only_last_logits)
    if not captured:
        raise SAEConfigError(f"cwac.hook_point {tap.hook_point}: the hook did not fire during a forward pass")
    return captured[0]


# ---------------------------------------------------------------------------------------------
# Loading SAEs.
# ---------------------------------------------------------------------------------------------


def load_sae(cfg: CWACConfig):
    """The SAE named by `cwac.sae` (a directory) or `cwac.sae_release` / `cwac.sae_id` (hub).

    On the CPU: `ActivationConstraint` moves to the model's device only the weights it reads.
    """
    from sae_lens import SAE

    if cfg.sae:
        path = Path(cfg.sae)
        if not (path / "cfg.json").is_file():
            raise SAEConfigError(
                f"cwac.sae: {path} is not a sae-lens SAE directory (no cfg.json). Train one with "
                "`cwac train-sae CONFIG.yml`, or point cwac.sae at a directory written by SAE.save_model"
            )
        sae = SAE.load_from_disk(str(path), device="cpu")
    elif cfg.sae_release:
        sae = SAE.from_pretrained(cfg.sae_release, cfg.sae_id, device="cpu")
    else:
        raise SAEConfigError("set cwac.sae (a local sae-lens directory) or cwac.sae_release and cwac.sae_id")
    for parameter in sae.parameters():
        parameter.requires_grad_(False)
    return sae.eval()


def hook_point_of(cfg: CWACConfig, sae) -> str:
    hook_point = cfg.hook_point or sae.cfg.metadata.hook_name
    if not hook_point:
        raise SAEConfigError("the SAE's metadata names no hook point: set cwac.hook_point (e.g. blocks.6.hook_resid_post)")
    return hook_point


def check_sae_fits(sae, model: nn.Module, hook_point: str) -> None:
    hidden = base_model_of(model).config.hidden_size
    if sae.cfg.d_in != hidden:
        raise SAEConfigError(
            f"the SAE reads {sae.cfg.d_in}-dimensional activations but the model's hidden size is {hidden}: "
            f"it was trained for another model. Train one for this model with `cwac train-sae`"
        )
    parse_hook_point(hook_point, len(decoder_layers(model)))


# ---------------------------------------------------------------------------------------------
# Activations of a data set at the hook point.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def token_activations(model: nn.Module, tap: ResidualTap, batches: Batches, desc: str = "activations") -> Tensor | None:
    """Residual activations of all non-padding tokens, float32 on CPU, in data order: on the first
    rank of a torchrun job (None on the others, which measured their share)."""
    chunks = []
    for index, batch, weight in ranks.progress(batches, desc):
        hidden = run_and_capture(model, tap, batch)
        if weight:
            chunks.append((index, hidden[batch["attention_mask"].bool()].float().cpu()))
    gathered = ranks.gather_in_order(chunks)
    return None if gathered is None else torch.cat(gathered)


@torch.no_grad()
def prompt_hidden_states(model: nn.Module, tap: ResidualTap, batches: Batches, desc: str) -> list[Tensor] | None:
    """Per prompt, the residual activations at its prompt tokens (float32, CPU), in data order, on
    the first rank: what feature selection encodes, after the model is done (and, in `cwac prepare`,
    before the SAE that encodes them is trained)."""
    rows = []
    for index, batch, weight in ranks.progress(batches, desc):
        hidden = run_and_capture(model, tap, batch)
        prompt_mask = (batch["labels"] == -100) & batch["attention_mask"].bool()
        if weight:
            rows.append((index, [h[m].float().cpu() for h, m in zip(hidden, prompt_mask, strict=True)]))
    gathered = ranks.gather_in_order(rows)
    return None if gathered is None else [prompt for batch in gathered for prompt in batch]


@torch.no_grad()
def prompt_feature_means(sae, prompts: list[Tensor]) -> Tensor:
    """Per prompt, the mean SAE activation over the prompt's tokens: (n_prompts, d_sae)."""
    lengths = torch.tensor([len(prompt) for prompt in prompts])
    owners = torch.repeat_interleave(torch.arange(len(prompts)), lengths).split(4096)
    parameter = sae.W_enc
    sums = torch.zeros(len(prompts), sae.cfg.d_sae)
    for chunk, owner in zip(torch.cat(prompts).split(4096), owners, strict=True):  # one chunk's z at a time
        sums.index_add_(0, owner, sae.encode(chunk.to(parameter.device, parameter.dtype)).float().cpu())
    return sums / lengths.clamp(min=1).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# Training an SAE with sae-lens's own trainer.
# ---------------------------------------------------------------------------------------------


def _activation_provider(activations: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless shuffled batches from cached activations: sae-lens's DataProvider protocol."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(activations.shape[0], generator=generator).split(batch_size):
            if index.numel() == batch_size:
                yield activations[index]


@torch.no_grad()
def reconstruction_report(sae, activations: Tensor) -> dict[str, float]:
    """Explained variance, mean L0 and dead features of an SAE on a set of activations."""
    z = torch.cat([sae.encode(chunk) for chunk in activations.split(4096)])
    reconstruction = torch.cat([sae.decode(chunk) for chunk in z.split(4096)])
    residual = (activations - reconstruction).square().sum()
    variance = (activations - activations.mean(0)).square().sum()
    return {
        "explained_variance": 1.0 - (residual / variance).item(),
        "l0": (z > 0).float().sum(1).mean().item(),
        "dead_features": int(((z > 0).sum(0) == 0).sum().item()),
        "d_sae": z.shape[1],
        "tokens": activations.shape[0],
    }


def train_sae(
    model: nn.Module, tokenizer, cfg: CWACConfig, examples: list[Example], max_length: int, out_dir: str | Path,
    seed: int = 0, recipe: dict | None = None,
) -> dict | None:
    """Train a TopK SAE on the model's activations at `cfg.hook_point` (default: `default_hook_point`)
    and save it (sae-lens format).

    In a torchrun job the first rank trains and writes; the others return None once they have run
    their share of the forwards.
    """
    cfg = with_default_hook_point(cfg, model)
    activations = sae_training_activations(model, tokenizer, cfg, examples, max_length)
    if activations is None:
        return None
    model_name = str(base_model_of(model).config._name_or_path)
    return fit_sae(activations, cfg, model_name, next(model.parameters()).device, out_dir, seed, recipe)


def sae_training_activations(
    model: nn.Module, tokenizer, cfg: CWACConfig, examples: list[Example], max_length: int
) -> Tensor | None:
    """Activations at `cfg.hook_point` of every token of `examples` (first rank only, else None)."""
    if not cfg.hook_point:
        raise SAEConfigError("cwac.hook_point is required by `cwac train-sae` (e.g. blocks.6.hook_resid_post)")
    model.eval()
    device = next(model.parameters()).device
    tap = ResidualTap(model, cfg.hook_point)
    try:
        return token_activations(model, tap, Batches(tokenizer, examples, max_length, 8, device))
    finally:
        tap.remove()


def fit_sae(
    activations: Tensor, cfg: CWACConfig, model_name: str, device: torch.device, out_dir: str | Path, seed: int = 0,
    recipe: dict | None = None,
) -> dict:
    """Train the SAE on cached activations and save it with its report.

    The activations are replayed, shuffled, to sae-lens's `SAETrainer`: no TransformerLens model
    is needed. 10% of the tokens are held out for the report.
    """
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(seed)
    order = torch.randperm(activations.shape[0], generator=torch.Generator().manual_seed(seed))
    held_out = activations[order[: max(1, len(order) // 10)]]
    train = activations[order[len(held_out) :]]
    d_in = activations.shape[1]
    batch_size = min(cfg.sae_batch_tokens, train.shape[0])
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=cfg.sae_width or 8 * d_in,
            k=min(cfg.sae_k, cfg.sae_width or 8 * d_in),
            device=str(device),
        )
    )
    sae.cfg.metadata.hook_name = cfg.hook_point
    sae.cfg.metadata.model_name = model_name
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=cfg.sae_training_tokens,
            train_batch_size_samples=batch_size,
            lr=cfg.sae_lr,
            lr_end=cfg.sae_lr,  # constant schedule; sae-lens leaves it unset outside its runner
            device=str(device),
            dead_feature_window=max(1, cfg.sae_training_tokens // batch_size // 4),
            feature_sampling_window=max(1, cfg.sae_training_tokens // batch_size // 4),
        ),
        sae,
        _activation_provider(train, batch_size, seed),
    )
    sae = trainer.fit()
    report = reconstruction_report(sae.eval(), held_out.to(device)) | {"training_tokens": cfg.sae_training_tokens}
    if recipe is not None:  # what `cwac prepare` compares, to tell an up-to-date SAE from a stale one
        report["recipe"] = recipe

    def write(directory: Path) -> None:
        sae.save_inference_model(directory)
        write_json_atomically(directory / "cwac_report.json", report)

    save_directory_atomically(out_dir, write)
    return report


# ---------------------------------------------------------------------------------------------
# Feature selection.
# ---------------------------------------------------------------------------------------------


def score_features(harmful: Tensor, benign: Tensor, method: str) -> Tensor:
    """How much more each feature fires on harmful than on benign prompts (higher = more safety-critical).

    Inputs are (n_prompts, d_sae) per-prompt activations. Signed: features that fire more on benign
    prompts score low, since the constraint protects what the model does with harmful requests.
    """
    harmful, benign = harmful.double(), benign.double()
    difference = harmful.mean(0) - benign.mean(0)
    if method == "mean_diff":
        return difference.float()
    if method == "standardized":
        pooled = ((harmful.var(0, unbiased=False) + benign.var(0, unbiased=False)) / 2).sqrt()
        return (difference / (pooled + 1e-6)).float()
    if method == "auroc":
        # Mann-Whitney U: P(harmful activation > benign activation), ties counted half.
        values = torch.cat([harmful, benign])
        ranks = _average_ranks(values)
        n_h, n_b = harmful.shape[0], benign.shape[0]
        u = ranks[:n_h].sum(0) - n_h * (n_h + 1) / 2
        return (u / (n_h * n_b)).float()
    raise ValueError(f"cwac.feature_score must be standardized, mean_diff or auroc, got {method!r}")


def _average_ranks(values: Tensor) -> Tensor:
    """Column-wise ranks (1-based), ties given their average rank."""
    ranks = torch.empty_like(values)
    for column in range(values.shape[1]):
        _, inverse, counts = torch.unique(values[:, column], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        average = ends - (counts.double() - 1) / 2
        ranks[:, column] = average[inverse]
    return ranks


@dataclass
class FeatureSet:
    """The selected features and what training needs to penalise their drift."""

    hook_point: str
    sae: str
    indices: list[int]
    scores: list[float]
    reference_scale: list[float]
    score_method: str
    d_sae: int
    model: str = ""
    format: str = FEATURES_FORMAT
    recipe: dict | None = None  # what it was made from (`cwac prepare`)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_json_atomically(path, asdict(self))
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        path = Path(path)
        if not path.is_file():
            raise SAEConfigError(
                f"cwac.features: {path} does not exist. Select features first with `cwac features CONFIG.yml`"
            )
        try:
            data = json.loads(path.read_text())
            feature_set = cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise SAEConfigError(f"cwac.features: {path} is not a feature file written by `cwac features` ({err})") from err
        if feature_set.format != FEATURES_FORMAT:
            raise SAEConfigError(f"cwac.features: {path} has format {feature_set.format!r}, expected {FEATURES_FORMAT!r}")
        return feature_set

    def check_against(self, sae) -> None:
        bad = [i for i in self.indices if not 0 <= i < sae.cfg.d_sae]
        if bad:
            raise SAEConfigError(
                f"cwac.features: feature index {bad[0]} is out of range for the SAE's {sae.cfg.d_sae} features: "
                "the feature file was made for another SAE. Rerun `cwac features`"
            )


@torch.no_grad()
def select_features(
    model: nn.Module, tokenizer, sae, cfg: CWACConfig, harmful: list[Example], benign: list[Example], max_length: int
) -> tuple[FeatureSet, Tensor, Tensor] | None:
    """Score every feature on harmful vs benign prompts and keep the top `cfg.num_features`.

    Returns the feature set and the per-prompt activations (harmful, benign) for inspection; None
    on the ranks of a torchrun job other than the first.
    """
    hook_point = hook_point_of(cfg, sae)
    check_sae_fits(sae, model, hook_point)
    prompts = feature_prompt_states(model, tokenizer, hook_point, harmful, benign, max_length)
    if prompts is None:
        return None
    return features_from_states(sae, cfg, hook_point, *prompts, str(base_model_of(model).config._name_or_path))


@torch.no_grad()
def feature_prompt_states(
    model: nn.Module, tokenizer, hook_point: str, harmful: list[Example], benign: list[Example], max_length: int
) -> tuple[list[Tensor], list[Tensor]] | None:
    """The prompt tokens' activations of harmful and benign prompts (first rank only, else None)."""
    model.eval()
    device = next(model.parameters()).device
    tap = ResidualTap(model, hook_point)
    try:
        harmful_states, benign_states = (
            prompt_hidden_states(model, tap, Batches(tokenizer, examples, max_length, 8, device), desc)
            for examples, desc in ((harmful, "harmful"), (benign, "benign"))
        )
    finally:
        tap.remove()
    return None if harmful_states is None else (harmful_states, benign_states)


def features_from_states(
    sae, cfg: CWACConfig, hook_point: str, harmful: list[Tensor], benign: list[Tensor], model_name: str
) -> tuple[FeatureSet, Tensor, Tensor]:
    """The feature set from the prompt tokens' activations (`feature_prompt_states`)."""
    if cfg.num_features > sae.cfg.d_sae:
        raise SAEConfigError(f"cwac.num_features = {cfg.num_features} exceeds the SAE's {sae.cfg.d_sae} features")
    z_harm, z_benign = prompt_feature_means(sae, harmful), prompt_feature_means(sae, benign)
    scores = score_features(z_harm, z_benign, cfg.feature_score)
    top = scores.topk(cfg.num_features)
    indices = top.indices.tolist()
    scale = z_harm[:, indices].mean(0).clamp(min=1e-3)
    feature_set = FeatureSet(
        hook_point=hook_point,
        sae=cfg.sae or f"{cfg.sae_release}/{cfg.sae_id}",
        indices=indices,
        scores=top.values.tolist(),
        reference_scale=scale.tolist(),
        score_method=cfg.feature_score,
        d_sae=sae.cfg.d_sae,
        model=model_name,
    )
    return feature_set, z_harm, z_benign


# ---------------------------------------------------------------------------------------------
# The penalty.
# ---------------------------------------------------------------------------------------------


def feature_drift_loss(z: Tensor, z_ref: Tensor, mask: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(mean over tokens of sum over features of squared drift, mean absolute relative drift).

    z, z_ref: (..., m) selected-feature activations; mask: (...) tokens that count.
    """
    drift = z - z_ref
    if scale is not None:
        drift = drift / scale
    weights = mask.to(drift.dtype)
    tokens = weights.sum().clamp(min=1)
    loss = (drift.square().sum(-1) * weights).sum() / tokens
    mean_abs = (drift.detach().abs().mean(-1) * weights).sum() / tokens
    return loss, mean_abs


def anchor_spread(signals: list[Tensor], masks: list[Tensor], floor_fraction: float = 0.1) -> Tensor:
    """Each feature's standard deviation over the counted anchor tokens, floored at `floor_fraction` of
    the median of the features that vary: a scale in the signal's own units, which the harmful prompts'
    mean activation is not for pre-activations, and which no near-constant feature (a TopK feature
    that never fires on the anchors) can shrink towards zero; the penalty's heavy tail came from the
    smallest scales (benchmarks/README.md).

    signals: (..., m) per anchor batch; masks: the tokens that count, shaped like signals[..., 0].
    """
    counted = torch.cat([signal[mask] for signal, mask in zip(signals, masks, strict=True)])
    if not len(counted):
        raise SAEConfigError(
            "cwac.act_scale 'spread': no safety-anchor token is left to measure it on (cwac.act_skip_first "
            "leaves out every position of the anchors); lower cwac.act_skip_first"
        )
    spread = counted.float().std(0, correction=0)
    varying = spread[spread > 0]
    if not len(varying):
        raise SAEConfigError(
            "cwac.act_scale 'spread': none of the selected features varies on the safety anchors (with "
            "cwac.act_signal 'activation' they never fire there); use cwac.act_signal: preactivation or "
            "cwac.act_scale: mean"
        )
    return spread.clamp(min=float(varying.median()) * floor_fraction)


class ActivationConstraint:
    """lambda * L_act on the training model, with references from the aligned model.

    `loss(model, inputs, training_hidden)` is called inside the trainer's `compute_loss`: with
    anchor "safety" it forwards the next batch of safety anchors, whose reference activations are
    computed once, here, before any update or checkpoint load; with anchor "batch" it takes the
    training forward's own activations and runs the batch once more, without gradients and with
    adapters disabled, for the reference.

    The constraint owns the SAE it is given: it moves it to the model's device and dtype and
    releases the weights its encoding never reads (see `release_unread_weights`).
    """

    def __init__(self, model: nn.Module, sae, features: FeatureSet, cfg: CWACConfig, anchors: Batches | None):
        self.peft_model = base_model_peft(model)
        if cfg.act_anchor == "batch" and not self.has_adapter:
            raise SAEConfigError(
                "cwac.act_anchor 'batch' needs an adapter (LoRA/QLoRA) to compute the aligned model's "
                "reference; use cwac.act_anchor: safety for full fine-tuning"
            )
        check_sae_fits(sae, model, features.hook_point)
        features.check_against(sae)
        self.features = features
        self.lam = cfg.act_lambda
        self.anchor = cfg.act_anchor
        self.skip_first = cfg.act_skip_first
        self.signal = cfg.act_signal
        self.tap = ResidualTap(model, features.hook_point)
        self.indices = torch.tensor(features.indices)
        self.scale_from_anchors = cfg.act_normalize and cfg.act_scale == "spread"
        self.scale = torch.tensor(features.reference_scale) if cfg.act_normalize and not self.scale_from_anchors else None
        self.sae = sae
        self.selected_encoder: tuple[Tensor, Tensor] | None = None
        if self.signal == "preactivation":
            self.selected_encoder = (sae.W_enc.detach()[:, self.indices], sae.b_enc.detach()[self.indices])
        elif getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            # sae-lens's own fold (as in its fold_activation_whitening): the encoder absorbs the
            # decoder's row norms, so the same activations follow without reading the decoder.
            sae.fold_W_dec_norm()
            sae.cfg.rescale_acts_by_decoder_norm = False
        release_unread_weights(sae, self._encode_here, ("W_enc", "W_dec") if self.selected_encoder else ("W_dec",))
        self.anchors = anchors
        self._references: list[tuple[dict[str, Tensor], Tensor]] | None = None
        self._next_anchor = 0
        # Now, while the weights are the aligned ones even for full fine-tuning: a resumed run loads
        # its checkpoint later. ZeRO-3 parameters are empty shards until DeepSpeed's engine gathers
        # them, so there the references wait for the first step (see `check_resume`).
        if self.anchor == "safety" and not sharded_parameters(model):
            self._take_references(model)

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.peft_model, "disable_adapter")

    def check_resume(self, global_step: int) -> None:
        """Refuse to take references from resumed full fine-tuning weights: they are not aligned."""
        if global_step > 0 and self.anchor == "safety" and self._references is None and not self.has_adapter:
            raise SAEConfigError(
                "resuming full fine-tuning under DeepSpeed ZeRO-3 with cwac.activation_constraint: the "
                "aligned model's reference activations cannot be recomputed from resumed weights; resume "
                "under ZeRO-2 (references are taken before the checkpoint loads) or train with LoRA"
            )

    def _encode(self, hidden: Tensor) -> Tensor:
        """The selected features' activations, in float32 for the drift.

        The SAE runs in the residual stream's device and dtype: in float32 beside a bf16 model it
        would hold twice the memory (an 8x-wide SAE's encoder at 8B widths: 512 MiB instead of 256)
        for precision the activations it reads do not have.
        """
        placement = (hidden.device, hidden.dtype)
        if (self.sae.b_dec.device, self.sae.b_dec.dtype) != placement:  # b_dec: kept by every SAE
            self.sae.to(*placement)
            self.indices = self.indices.to(hidden.device)
            self.scale = None if self.scale is None else self.scale.to(hidden.device)
            if self.selected_encoder is not None:
                self.selected_encoder = tuple(weight.to(*placement) for weight in self.selected_encoder)
        return self._encode_here(hidden).float()

    def _encode_here(self, hidden: Tensor) -> Tensor:
        """The selected features from an SAE already on `hidden`'s device and dtype."""
        if self.selected_encoder is not None:
            encoder_columns, encoder_bias = self.selected_encoder
            return self.sae.process_sae_in(hidden) @ encoder_columns + encoder_bias
        return self.sae.encode(hidden)[..., self.indices]

    @torch.no_grad()
    def _take_references(self, model: nn.Module) -> None:
        """Anchor batches and their selected-feature activations under the aligned weights (and, with
        act_scale 'spread', the scale measured on them)."""
        references = []
        with self._aligned(model):
            for batch in self.anchors:
                references.append((batch, self._encode(run_and_capture(model, self.tap, batch))))
        self._references = references
        if self.scale_from_anchors:
            self.scale = anchor_spread(
                [z_ref for _, z_ref in references], [self._counted(batch["attention_mask"].bool()) for batch, _ in references]
            )

    def _counted(self, mask: Tensor, positions: Tensor | None = None) -> Tensor:
        """The tokens the penalty counts: `mask` less the first act_skip_first positions of each sequence."""
        if not self.skip_first:
            return mask
        if positions is None:
            positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
        return mask & (positions.to(mask.device) >= self.skip_first)

    @contextmanager
    def _aligned(self, model: nn.Module):
        """Adapters off when there are adapters (the aligned model exactly); else the current weights,
        which is why references are taken before the first update and before any resume."""
        if self.has_adapter:
            with self.peft_model.disable_adapter():
                yield
        else:
            yield

    @contextmanager
    def watching_training_forward(self) -> Iterator[list[Tensor]]:
        """With anchor 'batch', capture the training forward's own activations (no extra forward)."""
        if self.anchor == "batch":
            with self.tap.capture() as captured:
                yield captured
        else:
            yield []

    def loss(self, model: nn.Module, inputs: dict[str, Tensor], training_hidden: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(lambda * L_act, mean relative drift) for one micro-batch."""
        if self.anchor == "safety":
            if self._references is None:
                self._take_references(model)
            batch, z_ref = self._references[self._next_anchor % len(self._references)]
            self._next_anchor += 1
            z = self._encode(run_and_capture(model, self.tap, batch))
            mask = self._counted(batch["attention_mask"].bool())
        else:
            if not training_hidden:
                raise SAEConfigError(f"cwac.hook_point {self.tap.hook_point}: the hook did not fire in the training forward")
            z = self._encode(training_hidden[0])
            with torch.no_grad(), self._aligned(model):
                z_ref = self._encode(run_and_capture(model, self.tap, inputs))
            mask = inputs.get("attention_mask", torch.ones(z.shape[:-1], device=z.device)).bool()
            # position_ids restart at each packed sequence (sample_packing)
            mask = self._counted(mask, inputs.get("position_ids"))
        loss, drift = feature_drift_loss(z, z_ref, mask, self.scale)
        return self.lam * loss, drift

    def remove(self) -> None:
        self.tap.remove()


@torch.no_grad()
def release_unread_weights(sae, encode: Callable[[Tensor], Tensor], names: Iterable[str]) -> None:
    """Drop each of the SAE's weight matrices `names` that `encode` turns out not to read.

    Most encoders never read the decoder (matching pursuit does; TopK's `rescale_acts_by_decoder_norm`
    does until folded), and with the selected encoder columns copied out the preactivation signal
    reads neither matrix: at 8B widths an 8x-wide SAE's decoder is 256 MiB in bf16, its encoder as much.
    Whether a matrix is read is found by encoding a probe without it, which needs no knowledge of
    sae-lens's architectures; a matrix whose absence fails or changes the probe is kept.
    """
    # Shaped like the residual stream, (batch, sequence, d_in): some encoders read across positions.
    probe = torch.randn(1, 4, sae.cfg.d_in, generator=torch.Generator().manual_seed(0)).to(sae.b_dec)
    expected = encode(probe)
    for name in names:
        weight = sae._parameters.get(name)
        if weight is None:
            continue
        sae.register_parameter(name, None)
        try:
            unread = torch.equal(encode(probe), expected)
        except (AttributeError, TypeError, RuntimeError):
            unread = False
        if not unread:
            sae.register_parameter(name, weight)


def load_anchor_examples(cfg: CWACConfig) -> list[Example]:
    if not cfg.safety_data:
        raise SAEConfigError("cwac.safety_data is required by cwac.act_anchor 'safety' (the anchor prompts)")
    return load_examples(cfg.safety_data, "cwac.safety_data", cfg.anchor_examples)


def feature_table(
    feature_set: FeatureSet, z_harm: Tensor, harmful: Iterable[Example], top: int, prompts_per_feature: int = 3
) -> str:
    """The best features with the harmful prompts that fire them most, for a person to read."""
    harmful = list(harmful)
    lines = []
    for rank, (index, score) in enumerate(zip(feature_set.indices[:top], feature_set.scores[:top]), start=1):
        column = z_harm[:, index]
        lines.append(f"#{rank} feature {index}  score {score:.3f}  mean act on harmful {column.mean():.3f}")
        for row in column.topk(min(prompts_per_feature, len(harmful))).indices.tolist():
            lines.append(f"    {column[row]:.3f}  {harmful[row].prompt[:100]}")
    return "\n".join(lines)

