"""The Gemma tokenizer rebuilt from a GGUF vocabulary (benchmarks/gemma.py), on a vocabulary small enough to
check by hand: transformers' own GGUF conversion splits every word into characters."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from gemma import CONTROL, NORMAL, USER_DEFINED, gguf_tokenizer

PIECES = [
    ("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL),
    ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL), ("\n", USER_DEFINED), ("\n\n", USER_DEFINED),
    ("  ", USER_DEFINED),  # a run of spaces, stored as spaces in the GGUF
    ("▁", NORMAL), ("h", NORMAL), ("o", NORMAL), ("n", NORMAL), ("e", NORMAL), ("y", NORMAL),
    ("ho", NORMAL), ("ey", NORMAL), ("hon", NORMAL), ("honey", NORMAL), ("▁honey", NORMAL),
]


def tokenizer():
    tokens, types = zip(*PIECES)
    return gguf_tokenizer(list(tokens), [-float(i) for i in range(len(tokens))], list(types))


def test_words_are_whole_pieces_and_the_turn_tokens_special():
    tok = tokenizer()
    ids = tok("honey honey\n\nhoney").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "honey", "▁honey", "\n\n", "honey"]
    assert tok.decode(ids, skip_special_tokens=True) == "honey honey\n\nhoney"
    turn = tok("<start_of_turn>honey<end_of_turn>", add_special_tokens=False).input_ids
    assert turn == [4, 18, 5]
    spaced = tok("honey  honey", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(spaced) == ["honey", "▁▁", "honey"] and spaced[1] == 8


def test_the_chat_template_starts_with_bos_and_ends_turns_with_end_of_turn():
    tok = tokenizer()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "honey"}, {"role": "assistant", "content": "honey"}], tokenize=False
    )
    assert text == "<bos><start_of_turn>user\nhoney<end_of_turn>\n<start_of_turn>model\nhoney<end_of_turn>\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": "honey"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith(prompt) and prompt.endswith("<start_of_turn>model\n")
