"""`cwac verify` on saved models: what a half-precision save can and cannot show."""

import torch

from cwac_plugin.projection import project_input_side, project_output_side
from cwac_plugin.verify import DEFAULT_TOLERANCE, verify

from test_projection import random_subspace, tiny_llama


def saved_update(tmp_path, projected: bool, dtype: torch.dtype, scale: float = 3e-2):
    """The aligned model in float32, and a copy moved by a small update (kept out of the subspace, or
    not) saved in `dtype`, as Axolotl's merge of FSDP2 shards saves bf16 whatever training used."""
    aligned = tiny_llama()
    aligned.save_pretrained(tmp_path / "aligned")
    subspace = random_subspace(aligned)
    trained = tiny_llama()
    modules = dict(trained.named_modules())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in subspace.module_names:
            weight = modules[name].weight
            update = scale * torch.randn(weight.shape, generator=g)
            if projected:
                update = project_input_side(update, subspace.input_bases[name])
                update = project_output_side(update, subspace.output_bases[name])
            weight += update
    trained.to(dtype).save_pretrained(tmp_path / "trained")
    return verify(subspace, tmp_path / "aligned", model=tmp_path / "trained")


def test_a_bf16_save_of_a_kept_update_passes_within_its_rounding(tmp_path):
    result = saved_update(tmp_path, projected=True, dtype=torch.bfloat16)
    # the rounding of W (not of dW) is what the saved weights leak: far above 1e-5, within u ||W|| / ||dW||
    assert result.input_leakage > 10 * DEFAULT_TOLERANCE
    assert result.default_tolerance > result.input_leakage
    assert not result.failures()


def test_a_bf16_save_of_a_leaking_update_fails(tmp_path):
    result = saved_update(tmp_path, projected=False, dtype=torch.bfloat16)
    assert result.failures() and result.input_leakage > result.default_tolerance


def test_a_bf16_save_of_an_update_below_its_rounding_is_inconclusive(tmp_path):
    result = saved_update(tmp_path, projected=True, dtype=torch.bfloat16, scale=1e-4)
    assert any(problem.startswith("inconclusive") for problem in result.failures())


def test_a_float32_save_keeps_the_1e5_bound(tmp_path):
    result = saved_update(tmp_path, projected=True, dtype=torch.float32)
    assert result.default_tolerance == DEFAULT_TOLERANCE and result.input_leakage < 1e-6
