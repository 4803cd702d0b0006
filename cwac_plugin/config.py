"""The `cwac:` YAML block, validated by pydantic.

Axolotl mixes `CWACArgs` into its own config model (see `CWACPlugin.get_input_args`), so a
typo under `cwac:` fails validation instead of silently turning a safety constraint off.
The same model validates the block for the `cwac` CLI and for plain HF Trainer users.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

# Llama-style names, and the fused projections of Phi-3 (qkv_proj, gate_up_proj) and GPT-NeoX/Falcon
# (query_key_value): linear modules like the others, whose input side needs nothing special.
DEFAULT_TARGET_MODULES = [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
    "query_key_value",
]


class CWACConfig(BaseModel):
    """Settings of the weight constraint (safety subspace)."""

    model_config = ConfigDict(extra="forbid")
    # set by own_data.with_own_data: its summary file, and whether the contrast data are the model's too
    _own_data: str | None = PrivateAttr(default=None)
    _own_contrast: bool = PrivateAttr(default=False)

    @property
    def own_data(self) -> str | None:
        """The summary file of the data built from the model's own answers, or None (data given)."""
        return self._own_data

    @property
    def own_contrast(self) -> bool:
        """Whether the contrast data are built from the model's answers too (else given, or none)."""
        return self._own_contrast

    safety_data: str | None = Field(
        default=None,
        description="jsonl of harmful prompts with refusals: one object per line with `prompt` and "
        "`response`. Read by `cwac subspace` (methods activation and gradient). Unset: `cwac prepare` "
        "builds it from the model's own refusals to shipped Do-Not-Answer prompts (and `contrast_data`, "
        "if unset too, from its answers to shipped benign prompts).",
    )
    own_data_prompts: int = Field(
        default=256, ge=1, description="Harmful and benign prompts asked for the model's own data (safety_data unset).",
    )
    own_data_max_new_tokens: int = Field(
        default=96, ge=1, description="New tokens per answer the model gives for its own data.",
    )
    own_data_min_refusal_rate: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Below this share of refused harmful prompts the model is taken as not aligned and "
        "`cwac prepare` stops (safety_data unset).",
    )
    contrast_data: str | None = Field(
        default=None,
        description="jsonl of benign prompts with helpful answers (same fields). When set, the "
        "activation method uses the contrastive covariance C_safety - contrast_beta * C_benign.",
    )
    max_examples: int | None = Field(
        default=None, ge=1, description="Use at most this many examples of each data file."
    )
    max_length: int | None = Field(
        default=None,
        ge=8,
        description="Token limit per example when computing the subspace (default: `sequence_len`).",
    )
    batch_size: int = Field(default=8, ge=1, description="Batch size of `cwac subspace`.")

    weight_constraint: bool = Field(
        default=True,
        description="Keep weight updates out of the safety subspace. false = activation-only ablation.",
    )
    subspace: str | None = Field(
        default=None,
        description="Path of the subspace safetensors file: written by `cwac subspace`, read by training.",
    )
    subspace_method: Literal["activation", "gradient", "delta"] = Field(
        default="gradient",
        description="gradient: top singular vectors of refusal-loss gradients (the directions that "
        "unlearn refusals fastest; the default, chosen on the benchmark's validation split); "
        "activation: top eigenvectors of the inputs' second moment on safety_data; delta: top singular "
        "vectors of W_aligned - W_base (needs delta_base_model).",
    )
    contrast_beta: float = Field(
        default=1.0, ge=0.0, description="Weight of the benign covariance in the contrastive variant."
    )
    delta_base_model: str | None = Field(
        default=None,
        description="Checkpoint the aligned model was aligned from (method delta only).",
    )
    rank: int | None = Field(
        default=16,
        ge=1,
        description="Input-basis size k per module. With `energy` set it is an upper bound.",
    )
    energy: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Choose the smallest k whose eigenvalues hold this fraction of the spectrum. Needs "
        "the whole spectrum: the gradient method then keeps exact d x d moments instead of a sketch.",
    )
    output_rank: int = Field(
        default=16,
        ge=0,
        description="Output-basis size k' per module (V^T dW = 0). 0 = no output-side constraint.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Linear modules to protect, matched on the last component of the module name.",
    )
    layers: list[int] | None = Field(
        default=None, description="Decoder layer indices to protect (default: all)."
    )
    projection: Literal["update", "gradient"] = Field(
        default="update",
        description="update: re-impose the constraint on the weights after every optimizer step "
        "(exact under any optimizer). gradient: project gradients with tensor hooks (exact for "
        "plain SGD only; Adam's per-coordinate scaling leaks back into the subspace).",
    )
    log_leakage: bool = Field(
        default=True,
        description="Log cwac/leakage (||dW U||/||dW||) at every logging step. Under full fine-tuning "
        "the denominator comes from a 32-column sketch of the initial weights (a few % off).",
    )
    allow_partial: bool = Field(
        default=False,
        description="Train even though the subspace protects less than 90% of the trainable decoder "
        "parameters (a layer subset, unmatched fused or expert weights): the rest trains unconstrained.",
    )
    allow_precision_mismatch: bool = Field(
        default=False,
        description="Accept a subspace computed at another weight precision than training's (e.g. on the "
        "4-bit model for a bf16 run, when the model is too large to load at training precision).",
    )

    activation_constraint: bool = Field(
        default=False,
        description="Penalise drift of safety-critical SAE features (needs `sae` and `features`). "
        "With weight_constraint this is CWAC; alone it is the activation-only ablation.",
    )
    sae: str | None = Field(
        default=None,
        description="Local sae-lens SAE directory: written by `cwac train-sae`, or any SAE.save_model output.",
    )
    sae_release: str | None = Field(
        default=None, description="sae-lens pretrained release (needs the hub); used when `sae` is not set."
    )
    sae_id: str | None = Field(default=None, description="SAE id within `sae_release`.")
    hook_point: str | None = Field(
        default=None,
        description="Where the SAE reads the residual stream, in TransformerLens names: "
        "`blocks.L.hook_resid_post` = output of decoder layer L, `blocks.L.hook_resid_pre` = its input. "
        "Default: the SAE's own metadata.hook_name; for an SAE trained here, the output of the layer at 90% "
        "depth, `blocks.{int(0.9 * num_hidden_layers)}.hook_resid_post` (a middle layer does not protect; "
        "benchmarks/README.md).",
    )
    features: str | None = Field(
        default=None, description="JSON of selected features: written by `cwac features`, read by training."
    )
    num_features: int = Field(default=32, ge=1, description="How many safety-critical features to keep.")
    feature_score: Literal["standardized", "mean_diff", "auroc"] = Field(
        default="standardized",
        description="How a feature's separation of harmful from benign prompts is scored.",
    )
    act_lambda: float = Field(
        default=300.0, ge=0.0,
        description="Weight lambda of the feature-drift penalty (300: chosen with the default signal and scale on "
        "the benchmark's validation part, benchmarks/README.md; other signals or scales need their own).",
    )
    act_anchor: Literal["safety", "batch"] = Field(
        default="safety",
        description="safety: a fixed set of safety prompts with reference activations from the aligned "
        "model, one small batch per step. batch: the training batch, referenced against the "
        "adapter-disabled model (LoRA/QLoRA only).",
    )
    anchor_batch_size: int = Field(default=2, ge=1, description="Safety anchors forwarded per micro-batch.")
    anchor_examples: int = Field(default=64, ge=1, description="Safety examples used as anchors.")
    act_normalize: bool = Field(
        default=True, description="Divide each feature's drift by its reference scale (see act_scale)."
    )
    act_scale: Literal["mean", "spread"] = Field(
        default="spread",
        description="The reference scale: spread, each signal's standard deviation over the safety anchors' "
        "tokens under the aligned model, in the signal's own units (pre-activations too), floored at a tenth "
        "of the median so that no near-constant feature dominates; mean, each feature's mean activation on "
        "harmful prompts (the features file), which per-prompt means as small as 0.05 made a heavy-tailed "
        "penalty. spread needs act_anchor: safety; unset under act_anchor: batch, it is mean.",
    )
    act_signal: Literal["activation", "preactivation"] = Field(
        default="preactivation",
        description="What drift is measured on: the SAE's feature activations, or the selected features' "
        "encoder pre-activations (smooth where TopK/JumpReLU switch features on and off; d x m work and "
        "memory, not d x d_sae).",
    )
    act_skip_first: int = Field(
        default=0,
        ge=0,
        description="Leading positions of each sequence (of each packed sequence, by position_ids) left out "
        "of the penalty (the first token is an "
        "attention sink whose residual norm dwarfs the others).",
    )
    sae_width: int | None = Field(
        default=None, ge=1, description="Features of an SAE trained by `cwac train-sae` (default 8 x hidden)."
    )
    sae_k: int = Field(default=32, ge=1, description="Active features per token of the TopK SAE trained here.")
    sae_training_tokens: int = Field(default=200_000, ge=1, description="Training samples for `cwac train-sae`.")
    sae_batch_tokens: int = Field(default=1024, ge=1, description="Tokens per SAE training step.")
    sae_lr: float = Field(default=1e-3, gt=0.0, description="Learning rate of `cwac train-sae`.")

    eval_harmful: str | None = Field(
        default=None,
        description="Harmful prompts (jsonl with `prompt`, or text) answered while training: cwac/harmful_score "
        "and cwac/degenerate are logged every `eval_every` steps. A small held-out set (32-64 prompts).",
    )
    eval_benign: str | None = Field(
        default=None, description="Benign prompts answered while training: cwac/over_refusal is logged beside."
    )
    eval_every: int | None = Field(
        default=None, ge=1, description="Steps between in-training safety evaluations (default: Axolotl's eval_steps)."
    )
    eval_max_new_tokens: int = Field(default=64, ge=1, description="New tokens per answer of the in-training evaluation.")
    generate_batch_size: int = Field(
        default=32, ge=1,
        description="Prompts per generate call, for the model's own data and the in-training evaluation (SmolLM2 in "
        "float32 on 2 CPU cores: 64 answers in 46 s at 8, 21 s at 32, the same greedy answers). Lower it if "
        "generation runs out of memory: the KV cache grows with it.",
    )
    max_harmful_score: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Stop training (saying so) when the in-training harmful score exceeds this share.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        if isinstance(data, dict) and "eval_batch_size" in data:
            raise ValueError(
                "cwac.eval_batch_size was renamed cwac.generate_batch_size (it now also batches `cwac prepare`'s "
                "own-data answers): rename the key"
            )
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> CWACConfig:
        if not (self.weight_constraint or self.activation_constraint):
            raise ValueError(
                "cwac.weight_constraint and cwac.activation_constraint are both false: the plugin would do "
                "nothing. Enable one (both is CWAC), or remove cwac_plugin.CWACPlugin from plugins"
            )
        if self.activation_constraint and not self.features:
            raise ValueError(
                "cwac.features is required while cwac.activation_constraint is true: set it to the JSON "
                "`cwac features` writes (e.g. ./cwac/features.json)"
            )
        for key in ("max_harmful_score", "eval_benign", "eval_every"):
            if getattr(self, key) is not None and not self.eval_harmful:
                raise ValueError(f"cwac.{key} needs cwac.eval_harmful: the harmful prompts of the in-training evaluation")
        if self.act_anchor == "batch" and "act_scale" not in self.model_fields_set:
            self.act_scale = "mean"  # no safety anchors to measure the spread on
        if self.activation_constraint and self.act_normalize and self.act_scale == "spread" and self.act_anchor != "safety":
            raise ValueError(
                "cwac.act_scale 'spread' is measured on the safety anchors: set cwac.act_anchor: safety, "
                "or cwac.act_scale: mean"
            )
        if self.sae_id and not self.sae_release or self.sae_release and not self.sae_id:
            raise ValueError("cwac.sae_release and cwac.sae_id go together (a sae-lens pretrained SAE)")
        if self.weight_constraint and not self.subspace:
            raise ValueError(
                "cwac.subspace is required while cwac.weight_constraint is true: set it to the path "
                "`cwac subspace` writes (e.g. ./cwac/subspace.safetensors), or set "
                "cwac.weight_constraint: false"
            )
        if self.subspace_method == "delta" and not self.delta_base_model:
            raise ValueError(
                "cwac.subspace_method 'delta' needs cwac.delta_base_model: the checkpoint the "
                "aligned model was aligned from"
            )
        if self.rank is None and self.energy is None:
            raise ValueError("set cwac.rank (a fixed k) or cwac.energy (a spectrum fraction)")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError("cwac.layers holds decoder layer indices, which are >= 0")
        return self


# where an Axolotl config's artifacts go when the block names none: beside training's output
DEFAULT_ARTIFACTS = {"subspace": "subspace.safetensors", "sae": "sae", "features": "features.json"}


class CWACArgs(BaseModel):
    """What the plugin adds to Axolotl's config: one nested `cwac:` block."""

    cwac: CWACConfig | None = Field(default=None, description="CWAC safety constraints.")

    @model_validator(mode="before")
    @classmethod
    def _artifacts_beside_the_output(cls, data):
        """An empty `cwac:` block is a whole one: unset artifact paths default to `{output_dir}/cwac/`.

        Axolotl merges this class into its own config model, so the validator sees `output_dir`; the
        block itself (`CWACConfig`, also what HF Trainer users build) still asks for its paths.
        """
        if not isinstance(data, dict) or not isinstance(data.get("cwac", {}), dict | None) or "cwac" not in data:
            return data  # no block, or not a mapping: the field's own validation names it
        block = dict(data["cwac"] or {})
        directory = Path(data.get("output_dir") or "./model-out") / "cwac"
        for key, name in DEFAULT_ARTIFACTS.items():
            if block.get(key) is None and not (key == "sae" and block.get("sae_release")):
                block[key] = str(directory / name)
        return {**data, "cwac": block}
