"""Engine unit-test fixtures: tiny models built locally and the real SmolLM2, each made once per session."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit.fixtures.demo_models import build_tiny_llama, import_smollm2
from workers.pruning.data import BUILTIN_WIKI_EN, load_text


def tiny_llama_from_config(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """No tokenizer, no files: the fastest model with real Llama blocks, for algorithm tests."""
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("models") / "tiny-llama"
    build_tiny_llama(dest)
    return dest


@pytest.fixture(scope="session")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~60k characters of wiki-en as a local .txt dataset: enough windows, quick to tokenize."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(load_text(BUILTIN_WIKI_EN)[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    dest = tmp_path_factory.mktemp("models") / "smollm2-135m"
    import_smollm2(dest)  # ~20 s: dequantises the GGUF into fp32 safetensors
    yield dest
    shutil.rmtree(dest)  # 540 MB: pytest keeps the last runs' temporary folders


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_model("llava") -> the folder of that family's tiny model, built on first use (TINY_BUILDERS keys)."""
    from prunekit.fixtures.demo_models import TINY_BUILDERS

    root = tmp_path_factory.mktemp("families")

    def get(family: str) -> Path:
        dest = root / family
        if not dest.exists():
            TINY_BUILDERS[family](dest, 0)
        return dest

    return get
