"""Synthetic Llama models of any size, for tests and benchmarks of models larger than memory.

A seeded random-init Llama (HF's init: normal weights of std 0.02, norms at 1) of about the requested number of
parameters is written tensor by tensor through `ShardedWriter`, never built in memory: the largest tensor is the
most it holds. Each tensor has a generator of its own, seeded from (seed, tensor name), so the bytes do not depend
on the order of writing. config.json is written last: a folder holding it is a finished model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit.vocabulary import OUTPUT_SHARD_BYTES
from workers.pruning.weights_io import ShardedWriter, TensorInfo

INIT_STD = 0.02  # LlamaConfig's initializer_range, which HF's init draws the weights with
MLP_RATIO = 2.7  # intermediate / hidden; Llama-2 7B's 11008 / 4096 is 2.69
PARAMS_TOLERANCE = 0.05  # a chosen shape has a parameter count within this share of the request
RECORD_NAME = "synthetic.json"  # what the folder was made from (request, seed, dtype), beside config.json
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int

    def tensors(self, dtype: torch.dtype) -> list[TensorInfo]:
        """Every tensor of LlamaForCausalLM with untied embeddings, named and ordered as its state_dict."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = self.num_attention_heads * self.head_dim
        per_layer = [("self_attn.q_proj.weight", (attn, h)), ("self_attn.k_proj.weight", (attn, h)),
                     ("self_attn.v_proj.weight", (attn, h)), ("self_attn.o_proj.weight", (h, attn)),
                     ("mlp.gate_proj.weight", (i, h)), ("mlp.up_proj.weight", (i, h)),
                     ("mlp.down_proj.weight", (h, i)), ("input_layernorm.weight", (h,)),
                     ("post_attention_layernorm.weight", (h,))]
        out = [TensorInfo.of("model.embed_tokens.weight", dtype, (v, h))]
        for layer in range(self.num_hidden_layers):
            out += [TensorInfo.of(f"model.layers.{layer}.{name}", dtype, shape) for name, shape in per_layer]
        out += [TensorInfo.of("model.norm.weight", dtype, (h,)), TensorInfo.of("lm_head.weight", dtype, (v, h))]
        return out

    def num_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = self.num_attention_heads * self.head_dim
        per_layer = 4 * attn * h + 3 * h * i + 2 * h
        return 2 * self.vocab_size * h + h + self.num_hidden_layers * per_layer


def shape_for_width(hidden: int, vocab_size: int, layers: int) -> LlamaShape:
    # Llama's habits: heads of 128 from 3072 wide up (3B, 7B), of 64 below (1B and smaller); the MLP rounded to a
    # multiple of 256 (64 for narrow models).
    head_dim = 128 if hidden >= 3072 and hidden % 128 == 0 else 64
    multiple = 256 if hidden >= 1024 else 64
    intermediate = max(multiple, round(MLP_RATIO * hidden / multiple) * multiple)
    return LlamaShape(vocab_size, hidden, intermediate, layers, hidden // head_dim, head_dim)


def choose_shape(params: float, vocab_size: int) -> LlamaShape:
    """A Llama shape of about `params` parameters: among widths whose depth brings the count
    within PARAMS_TOLERANCE of the request, the one whose depth is closest to a Llama-like depth for its width
    (about 32 layers at 4096 wide, 28 at 3072, 23 at 2048)."""
    best: tuple[float, LlamaShape] | None = None
    # Rounder widths as they grow, as real models have them: multiples of 64, of 128 from 1024, of 256 from 2048.
    widths = [*range(64, 1024, 64), *range(1024, 2048, 128), *range(2048, 32768 + 1, 256)]
    for hidden in widths:
        one = shape_for_width(hidden, vocab_size, 1)
        per_layer = one.num_parameters() - shape_for_width(hidden, vocab_size, 0).num_parameters()
        layers = round((params - shape_for_width(hidden, vocab_size, 0).num_parameters()) / per_layer)
        if layers < 1:
            break  # wider only makes the embeddings alone larger
        shape = shape_for_width(hidden, vocab_size, layers)
        if abs(shape.num_parameters() - params) > PARAMS_TOLERANCE * params:
            continue
        ideal = max(2.0, 4 * math.sqrt(hidden / 64))
        score = abs(math.log(layers / ideal))
        if best is None or score < best[0]:
            best = (score, shape)
    if best is None:
        smallest = shape_for_width(64, vocab_size, 1).num_parameters()
        raise ValueError(f"no Llama of about {params:.3g} parameters with a vocabulary of {vocab_size}: the "
                         f"smallest has {smallest:,} (its embeddings and head alone are 2 x {vocab_size} x 64)")
    return best[1]


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def init_tensor(info: TensorInfo, seed: int) -> torch.Tensor:
    """HF's Llama init for one tensor: norms 1, the rest normal(0, 0.02), drawn in fp32 and cast."""
    if info.name.endswith("norm.weight"):
        return torch.ones(info.shape, dtype=info.dtype)
    generator = torch.Generator().manual_seed(tensor_seed(seed, info.name))
    values = torch.empty(info.shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator)
    return values.to(info.dtype)


@dataclass(frozen=True)
class SyntheticModel:
    folder: Path
    shape: LlamaShape
    num_parameters: int
    num_bytes: int  # of the weights
    files: tuple[Path, ...]


def write_synthetic_llama(dest: Path, params: float, dtype: torch.dtype, tokenizer: Any, seed: int = 0,
                          shard_bytes: int = OUTPUT_SHARD_BYTES) -> SyntheticModel:
    """Writes the model into dest (made if missing): tokenizer, weights shard by shard, then config.json."""
    from transformers import LlamaConfig

    shape = choose_shape(params, len(tokenizer))
    layout = shape.tensors(dtype)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)
    writer = ShardedWriter(dest, layout, shard_bytes)
    for info in layout:
        writer.write(info.name, init_tensor(info, seed))
    files = writer.close()
    name = next(key for key, value in DTYPES.items() if value == dtype)
    record = {"requested_params": params, "num_parameters": shape.num_parameters(), "dtype": name, "seed": seed,
              "shard_bytes": shard_bytes}
    (dest / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads, head_dim=shape.head_dim, max_position_embeddings=4096,
        rms_norm_eps=1e-5, initializer_range=INIT_STD, tie_word_embeddings=False, dtype=dtype,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    _write_last(dest / "config.json", config.to_json_string())
    return SyntheticModel(dest, shape, shape.num_parameters(), sum(info.nbytes for info in layout), tuple(files))


def read_record(folder: Path) -> dict[str, Any] | None:
    """What a synthetic model folder was made from, or None when it is not one."""
    path = folder / RECORD_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_last(path: Path, text: str) -> None:
    # Whole or not at all: a reader that sees config.json sees all of it.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: choose from {', '.join(DTYPES)}") from None

