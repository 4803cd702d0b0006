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
    return _seeded_llama(
        vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=4,
        num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(2, hidden // 128),
    )


def llama8b_shaped(layers: int):
    """`layers` random layers of Llama-3-8B's shape (hidden 4 096, MLP 14 336, 32 heads, 8 KV heads).

    The vocabulary is cut to layers/32 of 128 256, so that the LM head keeps its share of the
    multiply-adds (7% at 32 layers): a 2-layer stack with the full head would be mostly head.
    """
    return _seeded_llama(
        vocab_size=128_256 * layers // 32 // 64 * 64, hidden_size=4096, intermediate_size=14_336,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
    )


def _seeded_llama(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **config))
