"""The random Llamas and the character-level tokenizer the CPU benchmarks share (no download)."""

from __future__ import annotations

import torch


class ToyTokenizer:
    """Characters to ids: enough for `cwac_plugin.data.Batches`."""

    pad_token_id, eos_token_id, chat_template = 0, 1, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2 + ord(c) % 500 for c in text]}


def random_llama(hidden: int):
    """A seeded random 4-layer Llama; every width a multiple of 64 (bitsandbytes' CPU 4-bit kernel needs it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=4,
            num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(2, hidden // 128),
            max_position_embeddings=512,
        )
    )
