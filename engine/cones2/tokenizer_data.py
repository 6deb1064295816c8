"""A real CLIP BPE tokenizer built offline from the merges list shipped in `data/`.

`bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's merges list (MIT licence), as distributed inside
the open-clip-torch package; the vocabulary is derived from it the way CLIP defines it.
Used to build the embedded default model without network access.
"""
from __future__ import annotations

import gzip
from importlib import resources

N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges: vocab = 512 bytes + merges + 2 specials


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte -> printable-unicode symbols, in CLIP's vocabulary order: the printable
    bytes map to themselves and come first, the rest map to chr(256 + n) in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def build_clip_tokenizer(pad_token: str = "!"):
    """CLIPTokenizer with CLIP's 49408-token vocabulary; SD 2.x pads with "!", SD 1.x with the end token."""
    from transformers import CLIPTokenizer

    raw = resources.files("cones2").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if pad_token is None:
        pad_token = "<|endoftext|>"
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)
