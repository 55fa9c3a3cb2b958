"""The offline CLIP tokenizer, zero-shot accuracy, and the digits-clip model (tests/conftest.py builds it once)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.fixtures.clip_tokenizer import (
    CLIP_VOCAB_SIZE,
    END_OF_TEXT_ID,
    START_OF_TEXT_ID,
    build_clip_tokenizer,
    clip_vocab_and_merges,
)
from prunekit.fixtures.digits_clip import FINGERPRINT_FILE, Recipe, build_digits_clip, clip_config
from workers.pruning.images import digit_prompts, digits_split, pixel_values
from workers.pruning.spec import JobCancelled
from workers.pruning.zero_shot import digits_zero_shot_accuracy, zero_shot_accuracy, zero_shot_predictions

# Small enough to train in a few seconds: what matters here is that two builds agree bit for bit.
TINY = Recipe(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, projection_dim=16, epochs=1,
              batch_size=256)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- tokenizer ---------------------------------------------------------------------------------------


def test_clip_vocabulary_has_openai_layout() -> None:
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == CLIP_VOCAB_SIZE and len(merges) == 49152 - 256 - 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == START_OF_TEXT_ID and vocab["<|endoftext|>"] == END_OF_TEXT_ID
    assert vocab["".join(merges[0])] == 512  # merges follow the 512 byte symbols, in priority order


def test_clip_tokenizer_gives_openai_ids() -> None:
    tokenizer = build_clip_tokenizer(16)
    # The ids OpenAI's tokenizer gives for this often-quoted caption.
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tokenizer("a photo of the digit 3")["input_ids"]
    assert ids[0] == START_OF_TEXT_ID and ids[-1] == END_OF_TEXT_ID and len(ids) == 8
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "the</w>", "digit</w>",
                                                          "3</w>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of the digit 3"
    assert tokenizer("A  Photo OF the digit 3")["input_ids"] == ids  # lower-cased, spaces squeezed
    assert tokenizer.pad_token_id == END_OF_TEXT_ID
    assert len(tokenizer("word " * 40, truncation=True)["input_ids"]) == 16


# ---- zero-shot accuracy ------------------------------------------------------------------------------


class _OneHotClip(nn.Module):
    """A stand-in whose embeddings are chosen: a prompt embeds as the one-hot of its digit, an image as the
    first ten values of its top pixel row, so the right answer is known exactly."""

    def __init__(self, tokenizer: object) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids([f"{d}</w>" for d in range(10)]))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (input_ids[:, :, None] == self.digit_ids).any(dim=1).float()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values[:, 0, 0, :10]


def test_zero_shot_accuracy_is_the_fraction_of_closest_prompts() -> None:
    tokenizer = build_clip_tokenizer(16)
    model = _OneHotClip(tokenizer)
    closest = [3, 1, 4, 1, 5, 9, 2, 6]
    images = torch.zeros(len(closest), 3, 4, 10)
    images[torch.arange(len(closest)), 0, 0, torch.tensor(closest)] = 1.0
    images[:, 0, 0] += 0.01  # a common offset changes no cosine ranking
    assert zero_shot_predictions(model, tokenizer, images, digit_prompts()).tolist() == closest
    assert zero_shot_accuracy(model, tokenizer, images, closest, digit_prompts()) == 1.0
    wrong = [3, 1, 4, 1, 5, 9, 0, 0]
    for batch_size in (1, 3, 100):
        assert zero_shot_accuracy(model, tokenizer, images, wrong, digit_prompts(), batch_size) == 6 / 8
    with pytest.raises(JobCancelled):
        zero_shot_accuracy(model, tokenizer, images, wrong, digit_prompts(), should_cancel=lambda: True)
    with pytest.raises(ValueError, match="labels"):
        zero_shot_accuracy(model, tokenizer, images, wrong[:3], digit_prompts())


def test_zero_shot_accuracy_of_a_real_clip_matches_its_own_logits() -> None:
    from transformers import CLIPModel

    tokenizer = build_clip_tokenizer(16)
    torch.manual_seed(0)
    model = CLIPModel(clip_config(TINY)).eval()
    data = digits_split("heldout")
    images = pixel_values(data.images[:40], TINY.image_size)
    prompts = tokenizer(digit_prompts(), padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**prompts, pixel_values=images).logits_per_image.argmax(dim=-1)
    labels = data.labels[:40]
    accuracy = zero_shot_accuracy(model, tokenizer, images, labels, digit_prompts(), batch_size=7)
    assert accuracy == pytest.approx(float((expected == torch.tensor(labels)).float().mean()))


# ---- digits-clip -------------------------------------------------------------------------------------


def test_digits_clip_training_is_deterministic_and_cached(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert build_digits_clip(first, TINY) is True
    assert build_digits_clip(second, TINY) is True
    assert _sha256(first / "model.safetensors") == _sha256(second / "model.safetensors")

    written = (first / "model.safetensors").stat().st_mtime_ns
    assert build_digits_clip(first, TINY) is False  # the fingerprint matches: nothing is retrained
    assert (first / "model.safetensors").stat().st_mtime_ns == written

    other_seed = dataclasses.replace(TINY, seed=1)
    assert build_digits_clip(first, other_seed) is True  # another recipe replaces the cached model
    assert _sha256(first / "model.safetensors") != _sha256(second / "model.safetensors")
    assert json.loads((first / FINGERPRINT_FILE).read_text())["recipe"]["seed"] == 1


def test_digits_clip_loads_offline_and_classifies_held_out_digits(digits_clip_dir: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", FINGERPRINT_FILE):
        assert (digits_clip_dir / name).is_file(), name
    model = CLIPModel.from_pretrained(digits_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(digits_clip_dir)
    assert tokenizer("a photo of the digit 7")["input_ids"] == build_clip_tokenizer()("a photo of the digit 7")[
        "input_ids"]
    accuracy = digits_zero_shot_accuracy(model, tokenizer)
    assert accuracy > 0.85, accuracy

    # The saved processor (PIL's bicubic, uint8 input) gives nearly the pixels images.pixel_values gives,
    # so a user who prepares images the usual transformers way sees the same accuracy.
    from PIL import Image

    held_out = digits_split("heldout")
    grey = (held_out.images[:, 0] * 255).round().to(torch.uint8).numpy()
    pictures = [Image.fromarray(image).convert("RGB") for image in grey]
    processed = CLIPProcessor.from_pretrained(digits_clip_dir)(images=pictures, return_tensors="pt")["pixel_values"]
    assert processed.shape == (len(pictures), 3, 32, 32)
    assert float((processed - pixel_values(held_out.images, 32)).abs().mean()) < 0.05
    assert zero_shot_accuracy(model, tokenizer, processed, held_out.labels, digit_prompts()) > 0.85


def test_digits_clip_build_is_skipped_when_cached(digits_clip_dir: Path) -> None:
    started = time.perf_counter()
    assert build_digits_clip(digits_clip_dir) is False
    assert time.perf_counter() - started < 5
