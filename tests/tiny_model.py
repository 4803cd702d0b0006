"""Builds a tiny random decoder (Llama, Phi-3 or Mixtral) with a trained byte-level BPE tokenizer, fully offline.

The e2e tests need a real checkpoint directory that `axolotl train` and
`AutoModelForCausalLM.from_pretrained` accept; no hub is reachable, so we make one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

WORDS = (
    "how do i make a bomb hack steal poison weapon attack hurt kill drug illegal "
    "sorry cannot help with that request it is harmful please ask something else "
    "the cat sat on mat water is wet sky blue two plus three equals five capital "
    "france paris recipe bread flour yeast bake oven minutes write poem about sea "
    "what is why when where who tell me explain describe list give answer question"
).split()


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n_lines)]


# Llama; Phi-3 with fused qkv_proj / gate_up_proj; Mixtral with its experts as 3-D parameters.
ARCHITECTURES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                 "mixtral": ("MixtralConfig", "MixtralForCausalLM")}


def build_tiny_model(
    path: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, architecture: str = "llama"
) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False)
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(path)

    torch.manual_seed(seed)
    config_cls, model_cls = (getattr(transformers, name) for name in ARCHITECTURES[architecture])
    experts = {"num_local_experts": 4, "num_experts_per_tok": 2} if architecture == "mixtral" else {}
    config = config_cls(
        **experts,
        vocab_size=len(hf_tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model_cls(config).save_pretrained(path, safe_serialization=True)
    return path


def write_pairs(path: str | Path, pairs: list[tuple[str, str]]) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for prompt, response in pairs:
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def write_completion_dataset(path: str | Path, n: int = 64, seed: int = 1) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for line in corpus(n, seed):
            f.write(json.dumps({"text": line}) + "\n")
    return path
