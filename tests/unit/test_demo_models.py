import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from prunekit.fixtures.demo_models import build_tiny_llama
from workers.pruning.models import load_model


def test_tiny_llama_is_deterministic_and_complete(tiny_llama_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_tiny_llama(again)
    for name in ("config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_llama_dir / name).read_bytes()
    first, second = load_file(tiny_llama_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    config = json.loads((tiny_llama_dir / "config.json").read_text(encoding="utf-8"))
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 1024
    assert not list(tmp_path.glob(".again.*"))  # the temporary folder was renamed into place


def test_tiny_llama_tokenizer_round_trips_text(tiny_llama_dir: Path) -> None:
    tokenizer = load_model(tiny_llama_dir).tokenizer
    text = "Pruning removes 50% of the weights."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_other_seed_gives_other_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    build_tiny_llama(tmp_path / "other", seed=1)
    first = load_file(tiny_llama_dir / "model.safetensors")
    other = load_file(tmp_path / "other" / "model.safetensors")
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
