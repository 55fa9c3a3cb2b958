"""The real CLIP BPE tokenizer, rebuilt offline from the vocabulary file shipped in the open-clip-torch wheel.

OpenAI's CLIP vocabulary is not stored as a vocab.json anywhere we can reach; it is derived from the BPE
merges file: the 256 byte symbols, the same with the end-of-word suffix, one token per merge (the first
49152 - 256 - 2 merges, in order), then <|startoftext|> and <|endoftext|>: 49408 ids in all.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
END_OF_WORD = "</w>"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407
NUM_MERGES = 49152 - 256 - 2


def clip_bpe_path() -> Path:
    """The merges file inside the installed open_clip package, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")  # importing it would pull timm, ftfy and friends
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the CLIP vocabulary needs the open-clip-torch package "
                                "(pip install --no-deps open-clip-torch)")
    path = Path(spec.origin).parent / CLIP_BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{CLIP_BPE_FILE} is missing from the installed open-clip-torch package")
    return path


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in CLIP's id order (GPT-2's byte-to-unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # Bytes without a printable form are shifted past 255, in byte order, after the printable ones.
    shifted = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(shifted))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges(path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in priority order) exactly as OpenAI's CLIP tokenizer builds them."""
    lines = gzip.decompress((path or clip_bpe_path()).read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; the file holds far more merges than CLIP kept.
    merges = [_pair(line) for line in lines[1:1 + NUM_MERGES]]
    symbols = byte_symbols()
    tokens = symbols + [symbol + END_OF_WORD for symbol in symbols] + [left + right for left, right in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"the CLIP vocabulary should have {CLIP_VOCAB_SIZE} distinct tokens, got {len(vocab)}")
    return vocab, merges


def _pair(line: str) -> tuple[str, str]:
    left, right = line.split(" ")
    return left, right


def build_clip_tokenizer(model_max_length: int = 77) -> Any:
    """transformers' CLIPTokenizer over the real vocabulary; pads with <|endoftext|>, as OpenAI's CLIP does."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # A fresh dict: the tokenizer must not share (and could mutate) the cached one.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def save_clip_tokenizer(folder: Path, model_max_length: int = 77) -> None:
    """tokenizer.json for transformers, plus vocab.json and merges.txt as OpenAI CLIP folders on the Hub have."""
    build_clip_tokenizer(model_max_length).save_pretrained(folder)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "\n".join(f"{left} {right}" for left, right in merges)
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges_text}\n", encoding="utf-8")
