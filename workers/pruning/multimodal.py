"""Calibration inputs per model family: token windows for causal LMs, plus images for CLIP, LLaVA and BLIP-2.

Vision towers calibrate on real images: an image-text dataset (builtin:digits' train split or an uploaded
.zip) gives each sample an image, which becomes the model's pixel_values, and a caption, which the model's
tokenizer turns into its text. A text dataset can still calibrate a vision-language model (LLaVA's language
tower on wiki-en, say): its vision tower then falls back to deterministic synthetic images, smooth random
pictures normalised as CLIP's processor would, and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.pruning import data, images
from workers.pruning.models import MULTIMODAL_CLASSES
from workers.pruning.sequential import ModelInputs
from workers.pruning.spec import DEFAULT_CALIBRATION_DATASET, CalibrationSpec, EvaluationSpec, JobError

CAUSAL_LM = "causal-lm"
CLIP, LLAVA, BLIP2 = "clip", "llava", "blip-2"
# OpenAI CLIP's normalisation, which CLIP, LLaVA and BLIP-2 processors use.
_IMAGE_MEAN = images.CLIP_MEAN
_IMAGE_STD = images.CLIP_STD
_IMAGE_GRID = 8  # the random images' detail: an 8x8 grid of colours, bilinearly upsampled
_IMAGE_SEED_OFFSET = 7919  # images and synthetic text draw from different streams of the same job seed
SYNTHETIC_IMAGES = "synthetic"


@dataclass(frozen=True, eq=False)
class ModelAdapter:
    """A loaded model and its family, resolved once where the model is loaded and carried from there, so that
    the functions which differ per family read `family` instead of each looking at the config again."""

    model: nn.Module
    family: str  # CAUSAL_LM | CLIP | LLAVA | BLIP2


# What the functions below accept: a caller that holds an adapter passes it on; tests and benchmarks may pass
# the bare model, which is then adapted on the spot.
AnyModel = nn.Module | ModelAdapter


def adapt(model: AnyModel) -> ModelAdapter:
    """The model's adapter; the family is "clip" | "llava" | "blip-2" for the vision-language classes,
    "causal-lm" for everything else."""
    if isinstance(model, ModelAdapter):
        return model
    model_type = getattr(model.config, "model_type", "")
    return ModelAdapter(model, model_type if model_type in MULTIMODAL_CLASSES else CAUSAL_LM)


def calibration_dataset(model: AnyModel, requested: str) -> str:
    """The dataset a job calibrates on: `requested`, except that a CLIP model left at the default text dataset
    uses builtin:digits (CLIP only ever reads captions beside images). The API fills the default in, so an
    explicit builtin:wiki-en looks the same here; a CLIP job that really wants text alone uploads it as a file.
    A text-only model cannot read an image-text dataset: that is refused here, before any work."""
    kind = adapt(model).family
    if kind == CLIP and requested == DEFAULT_CALIBRATION_DATASET:
        return images.BUILTIN_DIGITS
    if kind == CAUSAL_LM and images.is_image_text(requested):
        raise JobError("dataset_error", f"{_dataset_name(requested)} is an image-text dataset, but this model is "
                                        "a text-only language model without a vision tower; calibrate it on a "
                                        f"text dataset such as {DEFAULT_CALIBRATION_DATASET}.")
    return requested


def job_data(model: AnyModel, tokenizer: Any, cal: CalibrationSpec, ev: EvaluationSpec, calibrate: bool,
             text_calibration: bool) -> tuple[ModelInputs | None, torch.Tensor | None, dict[str, Any]]:
    """Calibration inputs (when the method needs them) and perplexity windows (when asked and measurable).

    Text datasets are one token stream, cut per the benchmark protocol; image-text datasets give image and
    caption pairs. Without a tokenizer, only towers that never read the text (text_calibration False) can be
    calibrated, on seeded random token ids. Returns (calibration, evaluation, facts about the data for the
    report).
    """
    adapter = adapt(model)
    if calibrate and text_calibration and tokenizer is None:
        raise JobError("invalid_model", "The model folder has no tokenizer, and calibrating its language "
                                        "tower needs text; add the tokenizer files or target only 'vision'.")
    image_text = images.is_image_text(cal.dataset)
    info: dict[str, Any] = {"dataset": cal.dataset, "kind": "image-text" if image_text else "text"}
    streams: dict[str, torch.Tensor] = {}

    def tokens_of(dataset: str) -> torch.Tensor:
        if dataset not in streams:
            streams[dataset] = data.token_stream(dataset, tokenizer)
        return streams[dataset]

    calibration = windows = None
    if calibrate and image_text:
        calibration = image_text_inputs(adapter, tokenizer, cal, info)
    elif calibrate:
        windows = _text_windows(adapter, tokenizer, cal, tokens_of, info)
        pixels = None
        if adapter.family != CAUSAL_LM:
            # The explicit fallback: a text dataset has no images for the vision tower.
            pixels = synthetic_pixels(adapter, windows.shape[0], cal.seed)
            info["images"] = SYNTHETIC_IMAGES
            info["images_note"] = ("the calibration dataset is text only, so the vision tower was calibrated on "
                                   "seeded smooth random images; an image-text dataset calibrates it better")
        calibration = calibration_inputs(adapter, windows, pixels)

    evaluation = None
    if ev.perplexity:
        if tokenizer is None:
            info["perplexity_skipped"] = "the model folder has no tokenizer"
        elif perplexity_model(adapter) is None:
            info["perplexity_skipped"] = f"a {adapter.family} model is not a causal language model"
        else:
            # Captions are too short to measure perplexity on: an image-text job measures it on wiki-en.
            text_dataset = data.BUILTIN_WIKI_EN if image_text else cal.dataset
            evaluation = without_image_tokens(adapter, data.evaluation_windows(tokens_of(text_dataset),
                                                                               ev.num_samples, ev.seq_len))
            info["perplexity_dataset"] = text_dataset
    if not image_text and cal.dataset in streams:
        tokens = streams[cal.dataset]
        # Calibration starts in the second half of the tokens: a longer evaluation reaches into it.
        info["num_tokens"] = tokens.numel()
        info["evaluation_overlaps_calibration"] = (windows is not None and evaluation is not None
                                                   and evaluation.numel() > tokens.numel() // 2)
    return calibration, evaluation, info


def _text_windows(adapter: ModelAdapter, tokenizer: Any, cal: CalibrationSpec,
                  tokens_of: Callable[[str], torch.Tensor], info: dict[str, Any]) -> torch.Tensor:
    """Calibration token windows of a text dataset; seeded random ids when the folder has no tokenizer."""
    text_len = text_length(adapter, cal.seq_len)
    if tokenizer is None:
        info["text"] = "synthetic token ids (the model folder has no tokenizer)"
        return synthetic_token_windows(adapter, cal.num_samples, text_len, cal.seed)
    return data.calibration_windows(tokens_of(cal.dataset), cal.num_samples, text_len, cal.seed)


def image_text_inputs(model: AnyModel, tokenizer: Any, cal: CalibrationSpec, info: dict[str, Any]) -> ModelInputs:
    """num_samples image-caption pairs (a seeded draw without repeats) as the model's forward inputs.

    An image-text dataset smaller than num_samples is used whole: repeating a pair adds no information.
    """
    adapter = adapt(model)
    records = images.load_image_text(cal.dataset, "train", cal.archive_limits)
    generator = torch.Generator().manual_seed(cal.seed)
    chosen = torch.randperm(len(records), generator=generator)[:cal.num_samples]
    if isinstance(records.images, torch.Tensor):
        picked: Any = records.images[chosen]
    else:
        picked = [records.images[index] for index in chosen.tolist()]
    pixels = images.pixel_values(picked, image_size(adapter))
    text_len = text_length(adapter, cal.seq_len)
    if tokenizer is None:
        text, mask = synthetic_token_windows(adapter, len(chosen), text_len, cal.seed), None
        info["text"] = "synthetic token ids (the model folder has no tokenizer)"
    else:
        text, mask = caption_ids(adapter, tokenizer, [records.texts[index] for index in chosen.tolist()], text_len)
    info.update({"images": _dataset_name(cal.dataset), "num_samples": len(chosen), "num_records": len(records)})
    return calibration_inputs(adapter, text, pixels, mask)


def caption_ids(model: AnyModel, tokenizer: Any, captions: list[str], max_len: int) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Captions as right-padded token ids [n, longest] and their attention mask.

    CLIP's text tower pools at its end-of-text token, so CLIP captions keep the tokenizer's markers; LLaVA and
    BLIP-2 read a caption right after the image placeholders, as plain text (no BOS in mid-sequence).
    """
    adapter = adapt(model)
    encoded = tokenizer(captions, add_special_tokens=adapter.family == CLIP, truncation=True, max_length=max_len,
                        return_attention_mask=False, verbose=False)["input_ids"]
    longest = max(1, max(len(ids) for ids in encoded))
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    ids = torch.full((len(encoded), longest), int(pad), dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = 1
    return without_image_tokens(adapter, ids), mask


def image_size(model: AnyModel) -> int:
    return int(adapt(model).model.config.vision_config.image_size)


def _dataset_name(dataset: str) -> str:
    # The engine sees an upload as a scratch path; its file name is what a message can show.
    return dataset if dataset.startswith("builtin:") else Path(dataset).name


def text_length(model: AnyModel, seq_len: int) -> int:
    """Text tokens per calibration sample: CLIP's text tower has a short fixed context (77 for OpenAI CLIP)."""
    adapter = adapt(model)
    if adapter.family == CLIP:
        return min(seq_len, int(adapter.model.config.text_config.max_position_embeddings))
    return seq_len


def synthetic_token_windows(model: AnyModel, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Seeded random token ids: enough for towers that never see the text (a vision tower), when the model
    folder has no tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, _text_vocab_size(adapt(model)), (num_samples, seq_len), generator=generator)


def synthetic_images(num_samples: int, image_size: int, seed: int, channels: int = 3,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[num_samples, channels, size, size] normalised pixel values of smooth random images, reproducible."""
    generator = torch.Generator().manual_seed(seed + _IMAGE_SEED_OFFSET)
    coarse = torch.rand((num_samples, channels, _IMAGE_GRID, _IMAGE_GRID), generator=generator)
    pixels = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(_IMAGE_MEAN[:channels]).view(1, -1, 1, 1)
    std = torch.tensor(_IMAGE_STD[:channels]).view(1, -1, 1, 1)
    return ((pixels - mean) / std).to(dtype)


def synthetic_pixels(model: AnyModel, num_samples: int, seed: int) -> torch.Tensor:
    """Synthetic images sized for the model's vision tower: the fallback when the dataset has no images."""
    adapter = adapt(model)
    vision = adapter.model.config.vision_config
    return synthetic_images(num_samples, image_size(adapter), seed, int(getattr(vision, "num_channels", 3)))


def calibration_inputs(model: AnyModel, text: torch.Tensor, pixels: torch.Tensor | None = None,
                       text_mask: torch.Tensor | None = None) -> ModelInputs:
    """The model's forward inputs for every calibration sample: text [n, seq] (and its padding mask, if any),
    plus pixel values [n, 3, size, size] for a vision-language model.

    LLaVA and BLIP-2 see the image as placeholder tokens in input_ids that their forward replaces with image
    features: LLaVA with one token per vision patch (CLS dropped under the "default" feature strategy),
    BLIP-2 with one per Q-Former query. The placeholders come first, then the text, as in a captioning prompt.
    """
    adapter = adapt(model)
    if adapter.family == CAUSAL_LM:
        return ModelInputs({"input_ids": text}, {"use_cache": False})
    if pixels is None or pixels.shape[0] != text.shape[0]:
        raise ValueError("a vision-language model calibrates on one image per text sample")
    pixels = pixels.to(next(adapter.model.parameters()).dtype)
    if adapter.family == CLIP:
        masks = {} if text_mask is None else {"attention_mask": text_mask}
        return ModelInputs({"input_ids": text, "pixel_values": pixels, **masks})
    image_tokens = _image_token_count(adapter)
    placeholders = torch.full((text.shape[0], image_tokens), _image_token_id(adapter), dtype=text.dtype)
    input_ids = torch.cat([placeholders, without_image_tokens(adapter, text)], dim=1)
    text_mask = torch.ones_like(text) if text_mask is None else text_mask
    attention_mask = torch.cat([torch.ones_like(placeholders), text_mask.to(placeholders.dtype)], dim=1)
    return ModelInputs({"input_ids": input_ids, "pixel_values": pixels, "attention_mask": attention_mask},
                       {"use_cache": False})


def without_image_tokens(model: AnyModel, windows: torch.Tensor) -> torch.Tensor:
    """Text windows in which the image placeholder id cannot occur (it would be taken for an image)."""
    adapter = adapt(model)
    token_id = getattr(adapter.model.config, "image_token_id", None)
    if token_id is None:
        return windows
    replacement = getattr(_text_config(adapter), "pad_token_id", None) or 0
    return windows.masked_fill(windows == token_id, replacement)


def perplexity_model(model: AnyModel) -> nn.Module | None:
    """The causal LM whose perplexity measures the model on text alone; None for CLIP (not generative).

    LLaVA scores text-only windows through its own forward (no image); BLIP-2's forward always wants an
    image, so its inner language model is scored directly.
    """
    adapter = adapt(model)
    if adapter.family == CLIP:
        return None
    if adapter.family == BLIP2:
        return adapter.model.language_model
    return adapter.model


def _image_token_count(adapter: ModelAdapter) -> int:
    config = adapter.model.config
    if adapter.family == BLIP2:
        return int(config.num_query_tokens)
    vision = config.vision_config
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    # The vision tower's output has a CLS token first; "default" drops it, "full" keeps it.
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def _image_token_id(adapter: ModelAdapter) -> int:
    token_id = getattr(adapter.model.config, "image_token_id", None)
    if token_id is None:
        raise JobError("invalid_model", f"This {adapter.family} config has no image_token_index, so its "
                                        "forward cannot place image features into the text.")
    return int(token_id)


def _text_config(adapter: ModelAdapter) -> Any:
    return getattr(adapter.model.config, "text_config", None) or adapter.model.config


def _text_vocab_size(adapter: ModelAdapter) -> int:
    return int(_text_config(adapter).vocab_size)


def measures_accuracy(model: AnyModel) -> bool:
    """CLIP-style models (an image and a text embedding to compare) are measured by zero-shot accuracy."""
    return adapt(model).family == CLIP
