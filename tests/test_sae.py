"""Feature scoring, the drift penalty and its scaling under gradient accumulation (no Axolotl)."""

import pytest
import torch

from cwac_plugin.config import CWACConfig
from cwac_plugin.data import Batches, Example
from cwac_plugin.sae import (
    ActivationConstraint,
    FeatureSet,
    ResidualTap,
    SAEConfigError,
    anchor_spread,
    default_hook_point,
    feature_drift_loss,
    parse_hook_point,
    run_and_capture,
    score_features,
)

from test_projection import tiny_llama

PLANTED = [3, 11]


def planted_sae(d_in: int = 32, d_sae: int = 24, seed: int = 0):
    """A sae-lens StandardSAE whose features PLANTED read one 'harmful' direction each."""
    from sae_lens import StandardSAE, StandardSAEConfig

    g = torch.Generator().manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    directions = torch.linalg.qr(torch.randn(d_in, d_sae, generator=g))[0] if d_sae <= d_in else torch.randn(d_in, d_sae, generator=g)
    with torch.no_grad():
        sae.W_enc.copy_(directions / directions.norm(dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(sae.W_enc.T)
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


@pytest.mark.parametrize("method", ["standardized", "mean_diff", "auroc"])
def test_scoring_picks_features_that_fire_only_on_the_harmful_class(method):
    sae = planted_sae()
    g = torch.Generator().manual_seed(1)
    benign = 0.3 * torch.randn(40, 32, generator=g)
    harmful = 0.3 * torch.randn(30, 32, generator=g)
    for feature in PLANTED:  # harmful activations add each planted feature's direction
        harmful += 2.0 * sae.W_enc[:, feature]
    with torch.no_grad():
        scores = score_features(sae.encode(harmful), sae.encode(benign), method)
    assert set(scores.topk(2).indices.tolist()) == set(PLANTED)


def test_auroc_is_a_probability_with_ties_counted_half():
    harmful = torch.tensor([[1.0, 0.0, 5.0], [2.0, 0.0, 5.0]])
    benign = torch.tensor([[0.0, 0.0, 6.0], [0.5, 0.0, 6.0]])
    assert score_features(harmful, benign, "auroc").tolist() == [1.0, 0.5, 0.0]


def test_drift_loss_counts_masked_tokens_only():
    z_ref = torch.zeros(2, 3, 2)
    z = torch.ones(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    z[0, 2] = 100.0  # masked out
    loss, drift = feature_drift_loss(z, z_ref, mask, scale=torch.tensor([1.0, 2.0]))
    assert loss.item() == pytest.approx(1.0 + 0.25)
    assert drift.item() == pytest.approx(0.75)


def test_anchor_spread_is_each_features_deviation_over_counted_tokens_with_a_floor():
    wide = torch.tensor([[[0.0, 5.0, 1.0, 0.0], [2.0, 5.0, 3.0, 0.0], [100.0, -100.0, 100.0, 9.0]]])  # last token masked
    mask = torch.tensor([[True, True, False]])
    second = torch.tensor([[[4.0, 5.0, 1.0, 0.0]]])
    spread = anchor_spread([wide, second], [mask, torch.tensor([[True]])])
    # feature 0 over 0, 2, 4; features 1 (5, 5, 5) and 3 (a TopK feature that never fires) are constant:
    # floored at a tenth of the median of the varying ones (0 and 2), not at zero
    expected = [torch.tensor(v).std(correction=0).item() for v in ([0.0, 2.0, 4.0], [1.0, 3.0, 1.0])]
    floor = 0.1 * min(expected)  # torch's median of two values is the lower one
    assert spread.tolist() == pytest.approx([expected[0], floor, expected[1], floor], rel=1e-5)


def test_anchor_spread_refuses_what_it_cannot_measure():
    signal = torch.zeros(1, 3, 2)
    with pytest.raises(SAEConfigError, match="act_skip_first"):
        anchor_spread([signal], [torch.zeros(1, 3, dtype=torch.bool)])
    with pytest.raises(SAEConfigError, match="none of the selected features varies"):
        anchor_spread([signal], [torch.ones(1, 3, dtype=torch.bool)])


@pytest.mark.parametrize("skip_first", [0, 1])
def test_spread_scale_is_measured_on_the_anchors_in_the_signals_units(skip_first):
    """With act_scale spread the drift of each pre-activation is divided by its own spread over the
    counted anchor tokens (measured by hand here), not by the mean activation the features file holds."""
    model, constraint = lora_model_with_activation_constraint(act_signal="preactivation", act_scale="spread",
                                                              act_skip_first=skip_first)
    (batch, z_ref), = constraint._references
    counted = batch["attention_mask"].bool().clone()
    counted[:, :skip_first] = False
    by_hand = z_ref[counted].double().std(0, correction=0)
    by_hand = by_hand.clamp(min=0.1 * by_hand.median().item())
    assert torch.allclose(constraint.scale.double(), by_hand, rtol=1e-5)
    perturb_lora_b(model, 0.1)
    loss = constraint.loss(model, {}, [])[0].item()
    model_mean, mean = lora_model_with_activation_constraint(act_signal="preactivation", act_scale="mean",
                                                             act_skip_first=skip_first)
    perturb_lora_b(model_mean, 0.1)
    assert loss > 0 and loss != pytest.approx(mean.loss(model_mean, {}, [])[0].item())


def test_spread_scale_taken_at_the_first_step_when_references_wait(monkeypatch):
    """Under ZeRO-3 the references (and so the spread) are taken at the first loss, not at construction."""
    import cwac_plugin.sae as sae_module

    monkeypatch.setattr(sae_module, "sharded_parameters", lambda model: True)
    model, constraint = lora_model_with_activation_constraint(act_signal="preactivation", act_scale="spread")
    assert constraint._references is None and constraint.scale is None
    constraint.loss(model, {}, [])
    (batch, z_ref), = constraint._references
    assert torch.allclose(constraint.scale, anchor_spread([z_ref], [batch["attention_mask"].bool()]))


def test_spread_scale_needs_the_safety_anchors():
    with pytest.raises(ValueError, match="cwac.act_scale 'spread'.*act_anchor: safety"):
        CWACConfig(weight_constraint=False, activation_constraint=True, features="f.json", act_anchor="batch", act_scale="spread")


def test_hook_point_names_are_checked():
    assert parse_hook_point("blocks.1.hook_resid_post", 2) == (1, "post")
    with pytest.raises(SAEConfigError, match="decoder layers 0..1"):
        parse_hook_point("blocks.2.hook_resid_post", 2)
    with pytest.raises(SAEConfigError, match="is not supported"):
        parse_hook_point("blocks.0.attn.hook_z", 2)


def test_the_default_hook_point_reads_at_ninety_percent_depth_on_every_model():
    """SmolLM2-135M (30 layers) reads after layer 27, where the benchmark found the penalty protects;
    Llama-3-8B (32) after 28; every depth names a layer the model has."""
    assert default_hook_point(30) == "blocks.27.hook_resid_post"
    assert default_hook_point(32) == "blocks.28.hook_resid_post"
    for num_layers in range(1, 130):
        assert parse_hook_point(default_hook_point(num_layers), num_layers)[0] >= (num_layers - 1) * 0.85


def test_resid_post_is_the_decoder_layer_output_and_pre_its_input():
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, layer 0, layer 1 (normed)
    for hook_point, expected in (("blocks.0.hook_resid_post", hidden[1]), ("blocks.1.hook_resid_pre", hidden[1])):
        tap = ResidualTap(model, hook_point)
        with torch.no_grad(), tap.capture() as captured:
            model(input_ids=ids)
        tap.remove()
        assert torch.allclose(captured[0], expected, atol=1e-6)


def test_run_and_capture_stops_at_the_hook_point():
    """Later layers and the LM head do not run, and the activations are those of a full forward."""
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (2, 6))
    tap = ResidualTap(model, "blocks.0.hook_resid_post")
    later = []
    model.model.layers[1].register_forward_hook(lambda *_: later.append("layer 1"))
    model.lm_head.register_forward_hook(lambda *_: later.append("lm_head"))
    with torch.no_grad():
        early = run_and_capture(model, tap, {"input_ids": ids, "labels": ids})
        full = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    assert later == ["layer 1", "lm_head"]  # only from the full forward
    assert torch.equal(early, full)


def test_a_forward_that_cannot_stop_runs_the_lm_head_on_one_position():
    """Under ZeRO-3 the forward runs to the end; its logits are never read."""
    model = tiny_llama().train()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    tap = ResidualTap(model, "blocks.0.hook_resid_post")
    next(tap.layer.parameters()).ds_id = 0  # the mark of a ZeRO-3 partitioned parameter
    assert not tap.can_stop_early
    head_positions = []
    model.lm_head.register_forward_hook(lambda _module, args, _output: head_positions.append(args[0].shape[1]))
    hidden = run_and_capture(model, tap, {"input_ids": ids, "labels": ids})
    assert head_positions == [1]
    assert hidden.requires_grad
    assert torch.allclose(hidden, full, atol=1e-6)


def test_under_gradient_checkpointing_a_forward_with_gradients_still_stops_at_the_hook_point():
    """Only the hooked layer runs unchecked: the layers below keep their memory-saving recompute."""
    model = tiny_llama().train()
    ids = torch.randint(0, 64, (2, 6))
    tap = ResidualTap(model, "blocks.1.hook_resid_post")
    run_and_capture(model, tap, {"input_ids": ids}).square().sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    runs = []
    for name in ("model.layers.0", "model.layers.1", "lm_head"):
        model.get_submodule(name).register_forward_hook(lambda *_, name=name: runs.append(name))
    run_and_capture(model, tap, {"input_ids": ids}).square().sum().backward()
    # layer 0 in the forward and again in the backward; layer 1 ended in the tap's hook (before this
    # test's), and it was not recomputed; the LM head never ran
    assert runs == ["model.layers.0", "model.layers.0"]
    assert all(layer.gradient_checkpointing for layer in model.model.layers)  # for the training forward
    assert expected.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    assert all(torch.allclose(p.grad, expected[name], atol=1e-6) for name, p in model.named_parameters() if name in expected)


def examples(n: int = 4) -> list[Example]:
    return [Example(f"how do i make a bomb {i}", "sorry i cannot help") for i in range(n)]


class ToyTokenizer:
    """Enough of a tokenizer for Batches: characters to ids, no chat template."""

    pad_token_id = 0
    eos_token_id = 1
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2 + ord(c) % 60 for c in text]}


def lora_model_with_activation_constraint(
    lam: float = 1.0, hook_layer: int = 0, anchors: int = 4, dtype: torch.dtype = torch.float32, **settings
):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama().to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    sae = planted_sae()
    hook_point = f"blocks.{hook_layer}.hook_resid_post"
    features = FeatureSet(hook_point, "synthetic", list(range(8)), [1.0] * 8, [0.5] * 8, "standardized", 24)
    cfg = CWACConfig(
        weight_constraint=False, activation_constraint=True, features="f.json", act_lambda=lam, anchor_batch_size=anchors,
        **settings,
    )
    batches = Batches(ToyTokenizer(), examples(anchors), 32, anchors)
    return model, ActivationConstraint(model, sae, features, cfg, batches)


def test_full_finetune_references_are_the_weights_at_construction():
    """A resumed run loads its checkpoint after the constraint is built: the reference must not move."""
    model = tiny_llama()
    sae = planted_sae()
    features = FeatureSet("blocks.1.hook_resid_post", "synthetic", list(range(8)), [1.0] * 8, [0.5] * 8, "standardized", 24)
    cfg = CWACConfig(weight_constraint=False, activation_constraint=True, features="f.json", anchor_batch_size=4)
    constraint = ActivationConstraint(model, sae, features, cfg, Batches(ToyTokenizer(), examples(4), 32, 4))
    torch.manual_seed(0)
    with torch.no_grad():  # what loading a checkpoint does: other weights
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    loss, drift = constraint.loss(model, {}, [])
    assert loss.item() > 0 and drift.item() > 0
    constraint.check_resume(global_step=2)  # references exist: resuming is fine


def perturb_lora_b(model, std: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def test_loss_is_zero_at_the_aligned_model_and_grows_with_drift():
    model, constraint = lora_model_with_activation_constraint()
    loss, drift = constraint.loss(model, {}, [])
    assert loss.item() == 0.0 and drift.item() == 0.0
    losses = []
    for std in (0.01, 0.05, 0.2):
        perturb_lora_b(model, std)
        losses.append(constraint.loss(model, {}, [])[0].item())
    assert 0 < losses[0] < losses[1] < losses[2]


@pytest.mark.parametrize("signal", ["activation", "preactivation"])
def test_the_sae_runs_in_the_models_dtype_and_the_penalty_in_float32(signal):
    """A float32 SAE beside a bf16 model would hold twice its memory; the drift is still float32."""
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, constraint = lora_model_with_activation_constraint(dtype=dtype, act_signal=signal)
        held = [*constraint.sae.parameters(), *(constraint.selected_encoder or ())]
        assert {weight.dtype for weight in held} == {dtype}
        perturb_lora_b(model, 0.1)
        loss, drift = constraint.loss(model, {}, [])
        assert loss.dtype == drift.dtype == torch.float32
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
        losses[dtype] = loss.item()
    assert losses[torch.float32] > 0
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=0.05)


def test_preactivation_signal_is_the_saes_own_pre_activation_of_the_selected_features():
    model, constraint = lora_model_with_activation_constraint(act_signal="preactivation")
    assert constraint.loss(model, {}, [])[0].item() == 0.0
    perturb_lora_b(model, 0.1)
    assert constraint.loss(model, {}, [])[0].item() > 0
    hidden = torch.randn(2, 5, 32)
    seen = []
    same_sae = planted_sae()
    same_sae.hook_sae_acts_pre.register_forward_hook(lambda _m, _i, out: seen.append(out))
    same_sae.encode(hidden)
    assert torch.allclose(constraint._encode(hidden), seen[0][..., constraint.indices], atol=1e-6)


def with_random_weights(sae, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in sae.parameters():
            weight.normal_(generator=g).requires_grad_(False)
    return sae


def random_topk_sae(rescale_acts_by_decoder_norm: bool):
    from sae_lens import TopKSAE, TopKSAEConfig

    config = TopKSAEConfig(d_in=32, d_sae=24, k=4, rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm)
    return with_random_weights(TopKSAE(config), seed=1)


def matching_pursuit_sae():
    from sae_lens import MatchingPursuitSAE, MatchingPursuitSAEConfig

    return with_random_weights(MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=32, d_sae=24)), seed=2)


def temporal_sae():
    from sae_lens import TemporalSAE, TemporalSAEConfig

    config = TemporalSAEConfig(d_in=32, d_sae=24, n_heads=1, bottleneck_factor=8, kval_topk=4)
    return with_random_weights(TemporalSAE(config), seed=3)


@pytest.mark.parametrize(
    ("make_sae", "signal", "released"),
    [
        (planted_sae, "activation", {"W_dec"}),
        (lambda: random_topk_sae(False), "activation", {"W_dec"}),
        (lambda: random_topk_sae(True), "activation", {"W_dec"}),  # once the norms are folded in
        (lambda: random_topk_sae(True), "preactivation", {"W_enc", "W_dec"}),
        (matching_pursuit_sae, "activation", set()),  # its encoding is a pursuit over the decoder
        (temporal_sae, "activation", set()),  # tied weights; attends over the sequence
    ],
    ids=["standard", "topk", "topk-rescaled-by-decoder-norm", "topk-preactivation", "matching-pursuit", "temporal"],
)
def test_the_sae_weights_its_encoding_never_reads_are_released(make_sae, signal, released):
    """An unread decoder held on the device is memory for nothing (256 MiB in bf16 at 8B widths)."""
    features = FeatureSet("blocks.0.hook_resid_post", "s", [2, 7, 19], [1.0] * 3, [0.5] * 3, "x", 24)
    # act_scale mean: the toy anchors never fire these features, which a spread scale refuses
    cfg = CWACConfig(weight_constraint=False, activation_constraint=True, features="f.json", act_signal=signal, act_scale="mean")
    anchors = Batches(ToyTokenizer(), examples(2), 32, 2)
    constraint = ActivationConstraint(tiny_llama(), make_sae(), features, cfg, anchors)
    whole = make_sae()
    held = {name for name, _ in constraint.sae.named_parameters()}
    assert {name for name, _ in whole.named_parameters()} - held == released
    hidden = torch.randn(2, 5, 32)
    if signal == "activation":
        expected = whole.encode(hidden)[..., features.indices]
    else:
        expected = (whole.process_sae_in(hidden) @ whole.W_enc + whole.b_enc)[..., features.indices]
    assert torch.allclose(constraint._encode(hidden), expected, atol=1e-5)


def test_leading_positions_can_be_left_out_of_the_penalty():
    losses = {}
    for skip, scale in ((0, "spread"), (1, "spread"), (1000, "mean")):
        model, constraint = lora_model_with_activation_constraint(act_skip_first=skip, act_scale=scale)
        perturb_lora_b(model, 0.1)
        losses[skip] = constraint.loss(model, {}, [])[0].item()
    assert losses[1000] == 0.0  # every position skipped
    assert 0 < losses[1] != losses[0] > 0
    with pytest.raises(SAEConfigError, match="act_skip_first"):  # no anchor token left to measure a spread on
        model, constraint = lora_model_with_activation_constraint(act_skip_first=1000, act_scale="spread")
        constraint.loss(model, {}, [])


def test_leading_positions_of_each_packed_sequence_are_left_out(monkeypatch):
    """Under sample_packing one row holds several sequences; position_ids restart at each."""
    import cwac_plugin.sae as sae_module

    model, constraint = lora_model_with_activation_constraint(act_skip_first=1, act_anchor="batch")
    masks = []
    original = sae_module.feature_drift_loss
    monkeypatch.setattr(sae_module, "feature_drift_loss", lambda z, ref, mask, scale: masks.append(mask) or original(z, ref, mask, scale))
    ids = torch.randint(2, 60, (1, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])}
    with constraint.watching_training_forward() as hidden:
        model(**inputs)
    constraint.loss(model, inputs, hidden)
    assert masks[0].tolist() == [[False, True, True, False, True, True, True, False]]


def test_gradient_reaches_only_trainable_parameters_before_the_hook_point():
    model, constraint = lora_model_with_activation_constraint(hook_layer=0)
    constraint.loss(model, {}, [])  # references from the aligned model
    perturb_lora_b(model, 0.1)
    loss, _ = constraint.loss(model, {}, [])
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[n] is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is None for p in constraint.sae.parameters())
    layer0 = [n for n in grads if "layers.0." in n and "lora_A" in n]
    layer1 = [n for n in grads if "layers.1." in n and "lora_" in n]
    assert layer0 and any(grads[n].abs().sum() > 0 for n in layer0)
    assert layer1 and all(grads[n] is None or grads[n].abs().sum() == 0 for n in layer1)  # after the hook point


def test_feature_index_out_of_range_is_a_clear_error():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    features = FeatureSet("blocks.0.hook_resid_post", "s", [5, 99], [1.0, 1.0], [1.0, 1.0], "standardized", 100)
    cfg = CWACConfig(weight_constraint=False, activation_constraint=True, features="f.json")
    with pytest.raises(SAEConfigError, match="feature index 99 is out of range for the SAE's 24 features"):
        ActivationConstraint(model, planted_sae(), features, cfg, None)
    wide = planted_sae(d_in=48)
    with pytest.raises(SAEConfigError, match="reads 48-dimensional activations but the model's hidden size is 32"):
        ActivationConstraint(model, wide, FeatureSet("blocks.0.hook_resid_post", "s", [1], [1.0], [1.0], "x", 24), cfg, None)


def test_batch_anchor_needs_an_adapter():
    cfg = CWACConfig(weight_constraint=False, activation_constraint=True, features="f.json", act_anchor="batch")
    features = FeatureSet("blocks.0.hook_resid_post", "s", [1], [1.0], [1.0], "x", 24)
    with pytest.raises(SAEConfigError, match="act_anchor 'batch' needs an adapter"):
        ActivationConstraint(tiny_llama(), planted_sae(), features, cfg, None)


@pytest.mark.parametrize("model_normalises", [True, False], ids=["num_items_in_batch", "trainer-divides"])
def test_penalty_is_averaged_over_gradient_accumulation_like_the_main_loss(tmp_path, model_normalises):
    """One step with GA=1 x 4 equals one step with GA=2 x 2, in both of the Trainer's loss paths."""
    from transformers import Trainer, TrainingArguments

    from cwac_plugin.hf import install

    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 64, (4, 10), generator=g)]

    def one_step(micro_batch: int, accumulation: int) -> dict[str, torch.Tensor]:
        model, constraint = lora_model_with_activation_constraint(lam=50.0)
        perturb_lora_b(model, 0.05)  # start away from the reference so the penalty has a gradient
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{micro_batch}x{accumulation}"), per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1, optim="sgd",
            lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, seed=0,
            dataloader_drop_last=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.model_accepts_loss_kwargs = model_normalises
        with torch.no_grad():
            before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
        # references from the unperturbed (adapter-disabled) model, as in training
        install(trainer, activation=constraint)
        trainer.train()
        return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}

    full, accumulated = one_step(4, 1), one_step(2, 2)
    total = sum(d.square().sum() for d in full.values()).sqrt()
    difference = sum((full[n] - accumulated[n]).square().sum() for n in full).sqrt()
    assert total > 1e-3
    assert difference / total < 1e-4


@pytest.mark.parametrize("accumulation", [1, 2])
def test_logged_loss_is_the_task_loss_and_the_total_is_beside_it(tmp_path, accumulation):
    """With a penalty 10x the task loss or more, `loss` (and Axolotl's ppl, computed from it) must still read
    the task loss: before the first update it equals a run without the plugin on the same batch."""
    from transformers import Trainer, TrainingArguments

    from cwac_plugin.hf import install

    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 64, (4, 10), generator=g)]

    def first_log(with_penalty: bool) -> dict:
        # ~100x the task loss; the task loss is the fp32 total less the penalty, exact to ~1e-7 of the total
        model, constraint = lora_model_with_activation_constraint(lam=20.0)
        perturb_lora_b(model, 0.5)  # away from the reference: the penalty is large from the start
        args = TrainingArguments(
            output_dir=str(tmp_path / str(with_penalty)), per_device_train_batch_size=4 // accumulation,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1, optim="sgd", logging_steps=1,
            report_to=[], save_strategy="no", use_cpu=True, seed=0, dataloader_drop_last=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        if with_penalty:
            install(trainer, activation=constraint)
        trainer.train()
        return next(entry for entry in trainer.state.log_history if "loss" in entry)

    plain, constrained = first_log(False), first_log(True)
    assert constrained["cwac/act_loss"] > 10 * plain["loss"]
    assert constrained["loss"] == pytest.approx(plain["loss"], abs=2e-4)  # the Trainer rounds to 4 digits
    assert constrained["cwac/total_loss"] == pytest.approx(constrained["loss"] + constrained["cwac/act_loss"])


def test_penalty_metrics_are_read_on_the_host_only_when_logged():
    """A host read per micro-batch would stall a GPU between every forward and its backward."""
    from cwac_plugin.hf import _ActivationMetrics

    metrics = _ActivationMetrics()
    valueless = torch.ones((), device="meta")  # .item() on a meta tensor raises
    metrics.add(valueless, valueless)
    metrics = _ActivationMetrics()
    for act_loss, drift in [(1.0, 0.5), (3.0, 1.5)]:
        metrics.add(torch.tensor(act_loss), torch.tensor(drift))
    assert metrics.pop(torch.device("cpu")) == {"cwac/act_loss": 2.0, "cwac/feature_drift": 1.0}
    assert metrics.pop(torch.device("cpu")) == {"cwac/act_loss": 0.0, "cwac/feature_drift": 0.0}


def test_gradient_checkpointing_recompute_is_not_counted_twice():
    """The recompute during backward runs the hooked layer again; it must not be captured.

    Reentrant checkpointing (Axolotl's default) reruns the whole layer forward, hooks included;
    torch's non-reentrant variant stops the recompute early, before forward hooks would fire. It
    happens to the training forward, which anchor "batch" reads.
    """
    model, constraint = lora_model_with_activation_constraint(act_anchor="batch")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    perturb_lora_b(model, 0.1)
    calls = []
    constraint.tap.layer.register_forward_hook(lambda *_: calls.append(constraint.tap._active))
    inputs = {"input_ids": torch.randint(0, 64, (2, 6))}
    with constraint.watching_training_forward() as training_hidden:
        task_loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss, _ = constraint.loss(model, inputs, training_hidden)
    (task_loss + loss).backward()
    # The training forward was captured, the recompute ran but was not (the reference forward ends
    # in the tap's own hook, before this one).
    assert calls == [True, False]
    assert len(training_hidden) == 1
