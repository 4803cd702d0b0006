"""Safety and contrast data from the model's own answers (`cwac_plugin/own_data.py`), with the model's
generation replaced by written answers: what is kept, what is written, when it refuses to go on."""

import json
from pathlib import Path

import pytest

from cwac_plugin import own_data
from cwac_plugin.config import CWACConfig
from cwac_plugin.errors import ArtifactError
from cwac_plugin.prepare import needed, staleness, wanted_recipe

REFUSAL = "I'm sorry, but I can't help with that."


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def settings_in(tmp_path, **keys) -> CWACConfig:
    return own_data.with_own_data(CWACConfig(subspace=str(tmp_path / "cwac" / "subspace.safetensors"), **keys))


@pytest.fixture
def answering(monkeypatch):
    """The model's answers: `refuse(prompt)` decides per harmful prompt; benign prompts get an on-topic
    answer, except every fourth, which is refused."""
    import cwac_plugin.eval

    def install(refuse):
        harmful = set(own_data.shipped_prompts("harmful"))

        def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, synced, progress):
            assert batch_size == 32  # generate_batch_size's default, not the subspace's batch_size (8)
            answers = []
            for n, prompt in enumerate(prompts):
                if prompt in harmful:
                    answers.append(REFUSAL if refuse(prompt) else f"Sure! Here is how: {prompt} Step 1: start now.")
                else:
                    answers.append(REFUSAL if n % 4 == 3 else f"Good question. {prompt} The answer is that it depends "
                                   "on what you want, and here are the steps to do it well, one after another.")
            return answers

        monkeypatch.setattr(cwac_plugin.eval, "generate", fake_generate)

    return install


class Tokenizer:
    """Enough of a tokenizer for the length check: one token per word."""

    chat_template = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split())))}


def test_given_safety_data_is_used_as_it_is(tmp_path):
    given = CWACConfig(subspace="s.safetensors", safety_data="mine.jsonl")
    assert own_data.with_own_data(given) is given and given.own_data is None


def test_unset_data_are_resolved_beside_the_first_artifact(tmp_path):
    settings = settings_in(tmp_path, contrast_data="benign.jsonl")
    assert settings.safety_data == str(tmp_path / "cwac" / own_data.SAFETY_FILE)
    assert settings.contrast_data == "benign.jsonl"  # a given contrast set stays
    assert settings.own_data == str(tmp_path / "cwac" / own_data.SUMMARY_FILE)
    assert needed(settings)[0] == "own_data"


def test_build_keeps_the_models_refusals_and_on_topic_answers(tmp_path, answering):
    answering(lambda prompt: "how" in prompt.lower())  # refuses the how-to prompts only
    settings = settings_in(tmp_path, own_data_prompts=200, own_data_min_refusal_rate=0.1)
    summary = own_data.build(None, Tokenizer(), settings, 512, {"artifact": "own_data"})

    safety = read_jsonl(settings.safety_data)
    contrast = read_jsonl(settings.contrast_data)
    assert summary["harmful_asked"] == summary["benign_asked"] == 200
    assert summary["refused"] == len(safety) > 0 and all(r["response"] == REFUSAL for r in safety)
    assert all("how" in r["prompt"].lower() for r in safety)
    assert summary["answered"] == len(contrast) == 150  # every fourth benign answer was a refusal
    assert summary["refusal_rate"] == pytest.approx(len(safety) / 200)
    assert json.loads(Path(settings.own_data).read_text())["recipe"] == {"artifact": "own_data"}
    again = settings_in(tmp_path / "again", own_data_prompts=200, own_data_min_refusal_rate=0.1)
    own_data.build(None, Tokenizer(), again, 512, {})
    assert Path(again.safety_data).read_text() == Path(settings.safety_data).read_text()  # a fixed sample


def test_a_model_that_refuses_too_little_is_not_protected(tmp_path, answering):
    answering(lambda prompt: False)
    settings = settings_in(tmp_path, own_data_prompts=40)
    with pytest.raises(ArtifactError, match=r"it refused 0 \(0%, below cwac.own_data_min_refusal_rate 50%\).*not safety-aligned"):
        own_data.build(None, Tokenizer(), settings, 512, {})
    assert not (tmp_path / "cwac").exists()  # nothing half-written


def test_prompts_too_long_for_max_length_are_not_asked(tmp_path, answering):
    answering(lambda prompt: True)
    settings = settings_in(tmp_path, own_data_prompts=1000)
    summary = own_data.build(None, Tokenizer(), settings, 8, {})
    assert 0 < summary["harmful_asked"] < 939
    assert all(len(r["prompt"].split()) < 8 for r in read_jsonl(settings.safety_data))


def test_new_data_make_what_was_computed_from_the_old_stale(tmp_path, answering):
    answering(lambda prompt: True)
    settings = settings_in(tmp_path, own_data_prompts=20)
    cfg = {"base_model": "m"}
    own_data.build(None, Tokenizer(), settings, 512, wanted_recipe(cfg, settings, "own_data"))
    _, stale = staleness(cfg, settings)
    assert "own_data" not in stale and stale["subspace"] == "missing"
    _, stale = staleness(cfg, settings.model_copy(update={"own_data_prompts": 30}))
    assert stale["own_data"] == "settings.own_data_prompts: 20 -> 30"


def test_a_deleted_data_file_makes_the_own_data_missing(tmp_path, answering):
    answering(lambda prompt: True)
    settings = settings_in(tmp_path, own_data_prompts=20)
    cfg = {"base_model": "m"}
    own_data.build(None, Tokenizer(), settings, 512, wanted_recipe(cfg, settings, "own_data"))
    Path(settings.contrast_data).unlink()
    assert staleness(cfg, settings)[1]["own_data"] == "missing"


def test_training_refuses_own_data_made_with_other_settings(tmp_path, answering):
    """Weight constraint only: training reads no data, but a subspace made from stale own data is stale."""
    answering(lambda prompt: True)
    settings = settings_in(tmp_path, own_data_prompts=20)
    cfg = {"base_model": "m"}
    own_data.build(None, Tokenizer(), settings, 512, wanted_recipe(cfg, settings, "own_data"))
    _, stale = staleness(cfg, settings.model_copy(update={"own_data_prompts": 30}), at_training=True)
    assert stale["own_data"] == "settings.own_data_prompts: 20 -> 30"


def test_a_given_contrast_file_is_never_written(tmp_path, answering):
    answering(lambda prompt: True)
    mine = tmp_path / "cwac" / own_data.CONTRAST_FILE  # the same name as the one built, but given
    mine.parent.mkdir()
    mine.write_text('{"prompt": "hi", "response": "hello"}\n')
    settings = settings_in(tmp_path, contrast_data=str(mine), own_data_prompts=20)
    summary = own_data.build(None, Tokenizer(), settings, 512, {})
    assert summary["benign_asked"] == 0 and mine.read_text() == '{"prompt": "hi", "response": "hello"}\n'


def test_a_block_that_is_not_a_mapping_is_named():
    from pydantic import ValidationError

    from cwac_plugin.config import CWACArgs

    with pytest.raises(ValidationError, match="cwac"):
        CWACArgs.model_validate({"cwac": True, "output_dir": "out"})


def ask_on_ranks(rank: int, sharded: bool) -> dict:
    import torch

    import cwac_plugin.eval

    asked = []

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        asked.extend(prompts)
        return [f"answer to {prompt}" for prompt in prompts]

    cwac_plugin.eval.generate = fake_generate
    model = torch.nn.Linear(2, 2)
    if sharded:
        model.weight.ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    answers = own_data._ask(model, None, [f"prompt {i}" for i in range(5)], CWACConfig(subspace="s"), "asking")
    return {"asked": asked, "answers": answers}


@pytest.mark.parametrize("sharded", [False, True])
def test_on_two_ranks_each_prompt_is_asked_once_and_every_rank_has_every_answer(tmp_path, sharded):
    from test_ranks import run_ranks

    first, second = run_ranks(tmp_path, sharded, target=ask_on_ranks)
    assert first["asked"] == ["prompt 0", "prompt 2", "prompt 4"]
    # a sharded model's ranks must call generate as often as each other: the short share repeats its last
    assert second["asked"] == ["prompt 1", "prompt 3"] + ["prompt 3"] * sharded
    assert first["answers"] == second["answers"] == [f"answer to prompt {i}" for i in range(5)]
