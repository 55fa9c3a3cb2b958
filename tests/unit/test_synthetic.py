"""Synthetic Llama models: shapes and parameter counts, seeded bytes, bounded memory while writing, and the
`prunekit models synth` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prunekit.models_root import smollm2_tokenizer
from workers.pruning.models import load_model
from workers.pruning.synthetic import choose_shape, shape_for_width, write_synthetic_llama
from workers.pruning.weights_io import WeightFiles

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 49152  # SmolLM2's


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return smollm2_tokenizer()


def test_shapes_match_transformers_llama_and_its_parameter_count() -> None:
    shape = shape_for_width(128, 300, layers=3)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=shape.intermediate_size,
                         num_hidden_layers=3, num_attention_heads=shape.num_attention_heads,
                         num_key_value_heads=shape.num_attention_heads, head_dim=shape.head_dim,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    assert [(info.name, info.shape) for info in shape.tensors(torch.float32)] == expected
    assert shape.num_parameters() == sum(p.numel() for p in model.parameters())
    # By hand: 2 x 300 x 128 (embeddings, head) + 128 (final norm) + 3 x (4 x 128^2 + 3 x 128 x 320 + 2 x 128).
    assert shape.intermediate_size == 320  # 2.7 x 128 = 345.6, to a multiple of 64
    assert shape.num_parameters() == 2 * 300 * 128 + 128 + 3 * (4 * 128**2 + 3 * 128 * 320 + 2 * 128)


@pytest.mark.parametrize("params", [7e6, 6e7, 1e8, 5e8, 1e9, 3e9, 7e9, 70e9])
def test_chosen_shapes_are_within_ten_percent_and_llama_like(params: float) -> None:
    shape = choose_shape(params, VOCAB)
    assert abs(shape.num_parameters() - params) <= 0.1 * params
    assert shape.head_dim in (64, 128) and shape.num_attention_heads * shape.head_dim == shape.hidden_size
    assert 2.5 <= shape.intermediate_size / shape.hidden_size <= 3.0


def test_known_shapes() -> None:
    # Llama-2 7B's width and MLP (11008) at 7B, with SmolLM2's vocabulary.
    seven = choose_shape(7e9, VOCAB)
    assert (seven.hidden_size, seven.intermediate_size, seven.head_dim) == (4096, 11008, 128)
    with pytest.raises(ValueError, match="smallest has"):
        choose_shape(1e6, VOCAB)  # the embeddings and head alone are 6.3M parameters


def test_tiny_synth_loads_in_transformers_and_seeds_decide_the_bytes(tmp_path: Path, tokenizer: Any) -> None:
    made = write_synthetic_llama(tmp_path / "a", 7e6, torch.float32, tokenizer, seed=0, shard_bytes=8 * 2**20)
    assert abs(made.num_parameters - 7e6) <= 0.1 * 7e6
    assert len([p for p in made.files if p.suffix == ".safetensors"]) > 1

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == made.num_parameters
    assert model.config.vocab_size == len(tokenizer) == VOCAB
    q = model.model.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() - 0.02) < 0.002 and torch.equal(model.model.norm.weight, torch.ones(64))
    loaded = load_model(tmp_path / "a")  # the engine's own loader: weights and tokenizer
    ids = loaded.tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert torch.isfinite(loaded.model(ids).logits).all()

    write_synthetic_llama(tmp_path / "b", 7e6, torch.float32, tokenizer, seed=0, shard_bytes=8 * 2**20)
    write_synthetic_llama(tmp_path / "c", 7e6, torch.float32, tokenizer, seed=1, shard_bytes=8 * 2**20)
    for path in made.files:
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()
    a, c = WeightFiles(tmp_path / "a"), WeightFiles(tmp_path / "c")
    for name in a.names():
        same = torch.equal(a.get(name), c.get(name))
        assert same == name.endswith("norm.weight")  # only the norms (all ones) agree between seeds


def test_bf16_synth_is_bf16_on_disk(tmp_path: Path, tokenizer: Any) -> None:
    made = write_synthetic_llama(tmp_path, 7e6, torch.bfloat16, tokenizer, shard_bytes=64 * 2**20)
    weights = WeightFiles(tmp_path)
    assert {weights.info(name).dtype for name in weights.names()} == {torch.bfloat16}
    assert made.num_bytes == 2 * made.num_parameters == weights.total_bytes()
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


_PEAK_SCRIPT = """
import gc, sys
from pathlib import Path
import torch
from prunekit.models_root import smollm2_tokenizer
from workers.pruning.synthetic import write_synthetic_llama

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) * 1024

tokenizer = smollm2_tokenizer()
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark (VmHWM) to the present resident set
base = status("VmRSS:")
made = write_synthetic_llama(Path(sys.argv[1]), 6e7, torch.float32, tokenizer, shard_bytes=32 * 2**20)
print(made.num_bytes, status("VmHWM:") - base)
"""


def test_writing_a_larger_model_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    # A process of its own, so that the peak is this write's alone.
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "m")], cwd=ROOT, check=True,
                            capture_output=True, text=True, timeout=300)
    model_bytes, growth = map(int, result.stdout.split())
    assert model_bytes > 230 * 2**20  # ~60M fp32 parameters
    # The largest tensor, the embeddings or the head (49152 x 384 fp32 = 75 MB), is the most held at once.
    assert growth < model_bytes / 2, (growth, model_bytes)


def test_cli_synth_registers_the_model(tmp_path: Path) -> None:
    env = {**os.environ, "MODELS_ROOT": str(tmp_path / "models"), "PRUNEKIT_VAR_DIR": str(tmp_path / "var")}
    command = [str(ROOT / ".venv/bin/prunekit"), "models", "synth", "synth-7m", "--params", "7e6", "--seed", "3",
               "--shard-size-mb", "8"]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=300).stdout
    folder = tmp_path / "models" / "synth-7m"
    assert f"local:synth-7m -> {folder}" in out and "parameters: 6,985,408" in out
    assert (folder / "config.json").is_file() and (folder / "model.safetensors.index.json").is_file()
    assert not list((tmp_path / "models").glob(".synth-7m.*"))  # the temporary folder was renamed into place
    assert not (tmp_path / "models" / ".building" / "synth-7m.json").exists()
    listed = subprocess.run([str(ROOT / ".venv/bin/prunekit"), "models", "list"], env=env, check=True,
                            capture_output=True, text=True, timeout=60).stdout
    assert "local:synth-7m\n" in listed
    again = subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=300).stdout
    assert "already there" in again
