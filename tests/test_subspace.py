"""Subspace computation (activation, contrastive, gradient, delta) and the subspace file."""

from pathlib import Path

import pytest
import torch
from torch import nn

from cwac_plugin.config import CWACConfig
from cwac_plugin.models import find_target_modules
from cwac_plugin.subspace import (
    Subspace,
    SubspaceError,
    activation_moments,
    bases_from_moments,
    choose_rank,
    compute_subspace,
    gradient_moments,
    output_moments,
    response_loss,
    sketch_test_matrix,
    top_directions,
    top_eigenvectors,
)

from test_projection import orthonormal, tiny_llama

PAD = 0


class PlantedInputs(nn.Module):
    """Inputs of `proj` lie in span(lift) for real tokens; padding adds a large outside direction."""

    def __init__(self, lift: torch.Tensor, outside: torch.Tensor):
        super().__init__()
        self.emb = nn.Embedding(32, lift.shape[1])
        self.register_buffer("lift", lift)
        self.register_buffer("outside", outside)
        self.proj = nn.Linear(lift.shape[0], 5)

    def forward(self, input_ids, attention_mask=None, **_):
        hidden = self.emb(input_ids) @ self.lift.T + 100.0 * (input_ids == PAD).unsqueeze(-1) * self.outside
        return self.proj(hidden)


def padded_batches(token_sets: list[list[int]]) -> list[dict]:
    width = max(map(len, token_sets))
    ids = torch.tensor([t + [PAD] * (width - len(t)) for t in token_sets])
    return [{"input_ids": ids, "attention_mask": (ids != PAD).long()}]


def spans(basis: torch.Tensor, target: torch.Tensor) -> bool:
    return torch.allclose(basis @ (basis.T @ target), target, atol=1e-4) and basis.shape[1] == target.shape[1]


def test_activation_basis_spans_planted_inputs_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    basis = orthonormal(12, 4, g)
    lift, outside = basis[:, :3], basis[:, 3]
    model = PlantedInputs(lift, outside)
    batches = padded_batches([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]])  # ragged: padding present
    moments, tokens = activation_moments(model, {"proj": model.proj}, batches, desc="t")
    assert tokens == 10
    (u,) = bases_from_moments(moments, {}, rank=3, energy=None, output_rank=0)[0].values()
    assert spans(u, lift)
    assert (u.T @ outside).abs().max() < 1e-4


def test_output_moments_equal_the_second_moment_of_the_weight_part_of_outputs():
    g = torch.Generator().manual_seed(4)
    model = PlantedInputs(orthonormal(12, 4, g), torch.zeros(12))
    batches = padded_batches([[1, 2, 3, 4, 5], [6, 7, 8]])
    moments, tokens = activation_moments(model, {"proj": model.proj}, batches, desc="t")
    with torch.no_grad():
        ids = batches[0]["input_ids"]
        outputs = (model(ids) - model.proj.bias)[ids != PAD]
    expected = outputs.T @ outputs / tokens
    assert torch.allclose(output_moments({"proj": model.proj}, moments)["proj"], expected, atol=1e-5)


def test_contrastive_basis_drops_directions_benign_data_uses_more():
    g = torch.Generator().manual_seed(1)
    basis = orthonormal(12, 5, g)
    safety_only = basis[:, :2]
    model = PlantedInputs(basis, basis[:, 0])
    hooks = {"proj": model.proj}
    with torch.no_grad():
        # safety tokens 1-10 live in the safety-only directions, 11-19 (stronger) in the shared ones,
        # so plain safety statistics favour the shared directions; benign tokens 20-31 use those more
        model.emb.weight[1:11, 2:] = 0
        model.emb.weight[11:20, :2] = 0
        model.emb.weight[11:20, 2:] *= 4
        model.emb.weight[20:, :2] = 0
        model.emb.weight[20:, 2:] *= 8
    safety, _ = activation_moments(model, hooks, padded_batches([list(range(1, 20))]), "s")
    benign, _ = activation_moments(model, hooks, padded_batches([list(range(20, 32))]), "b")
    contrastive = {"proj": safety["proj"] - 1.0 * benign["proj"]}
    (u,) = bases_from_moments(contrastive, {}, rank=2, energy=None, output_rank=0)[0].values()
    assert spans(u, safety_only)
    (plain,) = bases_from_moments(safety, {}, rank=2, energy=None, output_rank=0)[0].values()
    assert (plain.T @ safety_only).abs().max() < 1e-4  # without the contrast: the wrong directions


def labelled_batches(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):
        ids = torch.randint(1, 64, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100  # prompts of different lengths: the loss reads some positions only
        labels[0, :5] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def test_gradient_moments_match_autograd_weight_gradients():
    model = tiny_llama().eval()
    modules = find_target_modules(model, ["q_proj", "down_proj"], layers=[1])
    batches = labelled_batches(2)
    # energy (and an output rank too wide to sketch) keep both moments whole
    moments_in, moments_out, _ = gradient_moments(model, modules, batches, "t", energy=0.9, output_rank=32)
    assert all(p.requires_grad for p in model.parameters())  # switched off for the pass only

    expected_in = {n: 0 for n in modules}
    expected_out = {n: 0 for n in modules}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for name, module in modules.items():
            grad = module.weight.grad.double()
            expected_in[name] = expected_in[name] + grad.T @ grad / len(batches)
            expected_out[name] = expected_out[name] + grad @ grad.T / len(batches)
    for name in modules:
        scale = expected_in[name].abs().max()
        assert torch.allclose(moments_in[name].double() / scale, expected_in[name] / scale, atol=1e-4)
        assert torch.allclose(moments_out[name].double() / scale, expected_out[name] / scale, atol=1e-4)


class WithoutLogitsToKeep(nn.Module):
    """A causal LM whose forward predates `logits_to_keep`: it returns every position's logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_response_loss_is_the_models_own_loss_with_or_without_logits_to_keep():
    model = tiny_llama().eval()
    for batch in labelled_batches(3):
        expected = model(**batch).loss
        for candidate in (model, WithoutLogitsToKeep(model)):
            assert torch.allclose(response_loss(candidate, batch), expected, atol=1e-6)


def test_sketched_gradient_moments_are_the_exact_moments_times_the_test_matrix():
    model = tiny_llama().eval()
    modules = find_target_modules(model, ["q_proj", "down_proj"], layers=[1])
    batches = labelled_batches(2)
    exact_in, exact_out, _ = gradient_moments(model, modules, batches, "t", energy=0.9, output_rank=32)
    sketch_in, sketch_out, _ = gradient_moments(model, modules, batches, "t", rank=2, output_rank=2)
    for name, module in modules.items():
        d_out, d_in = module.weight.shape
        assert sketch_in[name].shape == (d_in, 8) and sketch_out[name].shape == (d_out, 8)
        for exact, sketch in ((exact_in[name], sketch_in[name]), (exact_out[name], sketch_out[name])):
            expected = exact @ sketch_test_matrix(exact.shape[0], 8)
            assert torch.allclose(sketch, expected, atol=1e-5 * expected.abs().max())


def test_sketch_recovers_the_top_of_an_indefinite_spectrum():
    """A clear gap after the top k: the single-pass sketch finds the same subspace as eigh."""
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    tail = 0.005 * torch.randn(194, generator=g, dtype=torch.float64)
    spectrum = torch.cat([torch.linspace(10, 3, 6, dtype=torch.float64), tail])
    moment = q @ torch.diag(spectrum) @ q.T
    sketch = (moment @ sketch_test_matrix(200, 24).double()).float()
    basis = top_directions(sketch, rank=6, energy=None).double()
    expected = q[:, :6]
    assert basis.shape == (200, 6)
    assert torch.allclose(basis @ basis.T, expected @ expected.T, atol=1e-2)
    assert torch.equal(top_directions(sketch, rank=6, energy=None), basis.float())


def test_delta_method_recovers_planted_alignment_update(tmp_path):
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    aligned = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(3)
    planted = {}
    with torch.no_grad():
        for name, module in find_target_modules(aligned, ["v_proj"]).items():
            right = orthonormal(module.in_features, 2, g)
            left = orthonormal(module.out_features, 2, g)
            module.weight += left @ torch.diag(torch.tensor([3.0, 2.0])) @ right.T
            planted[name] = (right, left)
    cfg = CWACConfig(
        subspace="unused", subspace_method="delta", delta_base_model=str(tmp_path / "base"),
        target_modules=["v_proj"], rank=2, output_rank=2,
    )
    subspace = compute_subspace(aligned, tokenizer=None, cfg=cfg, max_length=16)
    assert sorted(subspace.module_names) == sorted(planted)
    for name, (right, left) in planted.items():
        assert spans(subspace.input_bases[name], right)
        assert spans(subspace.output_bases[name], left)


def test_lanczos_top_of_an_indefinite_spectrum_matches_full_eigh():
    """The fixed-rank path (Lanczos) gives the same subspace as eigh, deterministically."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.linspace(10, 3, 8, dtype=torch.float64), torch.randn(112, generator=g, dtype=torch.float64)])
    moment = q @ torch.diag(spectrum) @ q.T  # indefinite, like the contrastive C_s - beta C_b
    basis = top_eigenvectors(moment, rank=8, energy=None)
    expected = torch.linalg.eigh(moment).eigenvectors[:, -8:]
    assert torch.allclose(basis.double() @ basis.double().T, expected @ expected.T, atol=1e-6)
    assert torch.equal(basis, top_eigenvectors(moment, rank=8, energy=None))


def test_choose_rank():
    spectrum = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, -3.0])
    assert choose_rank(spectrum, rank=3, energy=None) == 3
    assert choose_rank(spectrum, rank=None, energy=0.5) == 1
    assert choose_rank(spectrum, rank=None, energy=0.75) == 2
    assert choose_rank(spectrum, rank=2, energy=0.99) == 2  # rank caps the energy choice
    assert choose_rank(spectrum, rank=10, energy=None) == 5  # negative directions are never kept


@pytest.fixture(scope="module")
def tiny_pretrained(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("method", ["activation", "gradient"])
def test_compute_subspace_on_tiny_model_round_trips_through_the_file(tmp_path, tiny_pretrained, data_files, method):
    model, tokenizer = tiny_pretrained
    cfg = CWACConfig(
        safety_data=str(data_files["safety"]), contrast_data=str(data_files["benign"]),
        subspace=str(tmp_path / "s.safetensors"), subspace_method=method, rank=6, output_rank=3, batch_size=4,
    )
    subspace = compute_subspace(model, tokenizer, cfg, max_length=32)
    assert len(subspace.module_names) == 2 * 7  # two layers, seven linear modules each
    for name, basis in subspace.input_bases.items():
        module = dict(model.named_modules())[name]
        assert basis.shape == (module.in_features, 6)
        assert subspace.output_bases[name].shape == (module.out_features, 3)
    path = subspace.save(cfg.subspace)
    loaded = Subspace.load(path)
    assert loaded.metadata["method"] == method and loaded.metadata["safety_examples"] == "10"
    assert loaded.metadata["model_type"] == "llama"
    for name in subspace.module_names:
        assert torch.equal(loaded.input_bases[name], subspace.input_bases[name])
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left


def test_compute_subspace_errors_name_the_key(tiny_pretrained, data_files):
    model, tokenizer = tiny_pretrained
    cfg = CWACConfig(safety_data=str(data_files["safety"]), subspace="s", rank=65)
    with pytest.raises(SubspaceError, match=r"cwac.rank = 65 exceeds the input dimension 64"):
        compute_subspace(model, tokenizer, cfg, max_length=32)
    cfg = CWACConfig(safety_data=str(data_files["safety"]), subspace="s", target_modules=["qkv"])
    with pytest.raises(SubspaceError, match=r"cwac.target_modules \['qkv'\].*match no linear module"):
        compute_subspace(model, tokenizer, cfg, max_length=32)


def test_subspace_file_errors(tmp_path):
    with pytest.raises(SubspaceError, match=r"cwac.subspace: .*missing.safetensors does not exist.*cwac subspace"):
        Subspace.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SubspaceError, match="is not a CWAC subspace file"):
        Subspace.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SubspaceError, match="not a readable safetensors file"):
        Subspace.load(tmp_path / "junk.safetensors")
    Subspace({"m": torch.ones(4, 2)}).save(tmp_path / "skewed.safetensors")
    with pytest.raises(SubspaceError, match="not orthonormal"):
        Subspace.load(tmp_path / "skewed.safetensors")


def test_subspace_for_another_architecture_is_rejected():
    from cwac_plugin.subspace import check_model_matches

    model = tiny_llama()
    basis = orthonormal(32, 2, torch.Generator().manual_seed(0))
    same = Subspace({"model.layers.0.self_attn.q_proj": basis}, metadata={"model_type": "llama", "hidden_size": "32"})
    check_model_matches(same, model)
    other = Subspace(
        {"model.layers.0.self_attn.q_proj": basis},
        metadata={"model": "Qwen/Qwen2-0.5B", "model_type": "qwen2", "hidden_size": "896"},
        path="qwen.safetensors",
    )
    with pytest.raises(SubspaceError, match=r"qwen.safetensors was computed for 'Qwen/Qwen2-0.5B' \(model_type=qwen2\)"):
        check_model_matches(other, model)


def test_subspace_from_other_settings_is_rejected_as_stale(tmp_path, tiny_pretrained, data_files):
    from cwac_plugin.subspace import check_settings_match

    model, tokenizer = tiny_pretrained
    cfg = CWACConfig(
        safety_data=str(data_files["safety"]), contrast_data=str(data_files["benign"]), rank=2, output_rank=2,
        subspace=str(tmp_path / "s.safetensors"),
    )
    subspace = Subspace.load(compute_subspace(model, tokenizer, cfg, max_length=32).save(cfg.subspace))
    check_settings_match(subspace, cfg)
    with pytest.raises(SubspaceError, match=r"computed with output_rank=2 but cwac.output_rank is 0\. Rerun"):
        check_settings_match(subspace, cfg.model_copy(update={"output_rank": 0}))
    stale_method = "computed with subspace_method=gradient but cwac.subspace_method is activation"
    with pytest.raises(SubspaceError, match=stale_method):
        check_settings_match(subspace, cfg.model_copy(update={"subspace_method": "activation"}))
    with pytest.raises(SubspaceError, match=r"computed with layers=None but cwac.layers is \[0\]"):
        check_settings_match(subspace, cfg.model_copy(update={"layers": [0]}))
    check_settings_match(Subspace(subspace.input_bases), cfg.model_copy(update={"rank": 3}))  # no record: no check


def test_interrupted_save_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    import safetensors.torch

    basis = orthonormal(8, 2, torch.Generator().manual_seed(0))
    target = tmp_path / "subspace.safetensors"
    Subspace({"m": basis}, metadata={"method": "old"}).save(target)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        Subspace({"m": basis}, metadata={"method": "new"}).save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["subspace.safetensors"]
    monkeypatch.undo()
    assert Subspace.load(target).metadata["method"] == "old"


def test_same_data_and_model_give_identical_subspace_files(tmp_path, tiny_pretrained, data_files):
    model, tokenizer = tiny_pretrained
    cfg = CWACConfig(safety_data=str(data_files["safety"]), contrast_data=str(data_files["benign"]), subspace="s", rank=4)
    first = Subspace.load(compute_subspace(model, tokenizer, cfg, max_length=32).save(tmp_path / "a.safetensors"))
    second = Subspace.load(compute_subspace(model, tokenizer, cfg, max_length=32).save(tmp_path / "b.safetensors"))
    # (the file bytes differ: safetensors writes metadata keys in hash order)
    assert first.metadata == second.metadata
    assert all(torch.equal(first.input_bases[n], second.input_bases[n]) for n in first.module_names)


def test_canonical_signs_make_a_basis_independent_of_the_solvers_sign_choice():
    from cwac_plugin.subspace import canonical_signs

    basis = torch.linalg.qr(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)))[0]
    flipped = basis * torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert torch.equal(canonical_signs(basis), canonical_signs(flipped))
    canonical = canonical_signs(basis)
    assert torch.allclose(canonical @ canonical.T, basis @ basis.T, atol=1e-6)  # the same span
    assert (canonical.gather(0, canonical.abs().argmax(0, keepdim=True)) > 0).all()
