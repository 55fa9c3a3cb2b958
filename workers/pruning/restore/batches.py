"""Training batches for restoration, made with the engine's own data code.

Language models (and LLaVA or BLIP-2 on a text dataset) train on windows of the token stream, as calibration
cuts them but drawn with another seed; CLIP trains on image-caption pairs (contrastive), LLaVA and BLIP-2 on
an image-text dataset on captions after their image placeholders (cross-entropy on the caption tokens only).
Each step draws its own batch from a generator seeded with (seed + step): reproducible, and no step's batch
depends on how many steps came before. Text windows start in the stream's second half, like calibration's, so
they stay clear of the evaluation windows whenever calibration does (report: evaluation_overlaps_calibration).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.vocabulary import ARCHIVE_LIMITS, ArchiveLimits
from workers.pruning import data, images, multimodal
from workers.pruning.restore.losses import IGNORE_INDEX
from workers.pruning.spec import JobError

CAUSAL_LM, CONTRASTIVE = "causal-lm", "contrastive"  # the objectives


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, Any]  # keyword arguments of the model's forward
    labels: torch.Tensor | None = None  # next-token labels (IGNORE_INDEX where nothing is predicted); None: CLIP

    def to(self, device: torch.device) -> Batch:
        inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                  for key, value in self.inputs.items()}
        return Batch(inputs, None if self.labels is None else self.labels.to(device))


@dataclass
class TrainingData:
    objective: str  # CAUSAL_LM | CONTRASTIVE
    model: nn.Module  # what batches are fed to: the model, or BLIP-2's inner language model on text
    batch: Callable[[int], Batch]  # step -> that step's batch (on the CPU)
    info: dict[str, Any] = field(default_factory=dict)  # for the report: dataset, kind, ...


def check_fits(model: multimodal.AnyModel, tokenizer: Any, dataset: str, batch_size: int) -> None:
    """Whether this model can be trained on `dataset` in batches of batch_size: checked right after loading,
    so that a job that cannot be restored fails before pruning rather than after."""
    kind = multimodal.adapt(model).family
    image_text = images.is_image_text(dataset)
    name = _name(dataset)
    if tokenizer is None:
        raise JobError("invalid_model", "Restoration trains on text (or captions), but the model folder has no "
                                        "tokenizer; add the tokenizer files or leave restore out.")
    if kind == multimodal.CAUSAL_LM and image_text:
        raise JobError("dataset_error", f"The restore dataset {name} is image-text, but this model is a text-only "
                                        "language model; restore it on a text dataset such as builtin:wiki-en.")
    if kind == multimodal.CLIP and not image_text:
        raise JobError("dataset_error", f"A CLIP model is restored on image-caption pairs (a contrastive loss), "
                                        f"but {name} is text only; use builtin:digits or an image-text upload.")
    if kind == multimodal.CLIP and batch_size < 2:
        raise JobError("invalid_spec", "A CLIP model is restored with a contrastive loss, which needs at least two "
                                       "image-text pairs per batch; set restore.batch_size to 2 or more.")


def training_data(model: multimodal.AnyModel, tokenizer: Any, dataset: str, batch_size: int, seq_len: int,
                  seed: int, archive_limits: ArchiveLimits = ARCHIVE_LIMITS) -> TrainingData:
    """The batches a model of this family trains on from `dataset` (builtin:... or a local file path)."""
    adapter = multimodal.adapt(model)
    check_fits(adapter, tokenizer, dataset, batch_size)
    image_text = images.is_image_text(dataset)
    info: dict[str, Any] = {"dataset": _name(dataset), "kind": "image-text" if image_text else "text"}
    if image_text:
        return _image_text(adapter, tokenizer, dataset, batch_size, seq_len, seed, info, archive_limits)
    return _text(adapter, tokenizer, dataset, batch_size, seq_len, seed, info)


def _text(adapter: multimodal.ModelAdapter, tokenizer: Any, dataset: str, batch_size: int, seq_len: int, seed: int,
          info: dict[str, Any]) -> TrainingData:
    tokens = data.token_stream(dataset, tokenizer)  # cached: usually tokenized already for calibration
    # Fails now, with the dataset's own message, rather than at the first step.
    data.calibration_windows(tokens, 1, seq_len, seed)
    lm = multimodal.perplexity_model(adapter)
    assert lm is not None  # CLIP never gets here

    def batch(step: int) -> Batch:
        # Calibration's windows: seeded starts in the stream's second half, away from the evaluation windows.
        ids = multimodal.without_image_tokens(adapter, data.calibration_windows(tokens, batch_size, seq_len,
                                                                                seed + step))
        return Batch({"input_ids": ids, "use_cache": False}, labels=ids)

    if lm is not adapter.model:
        info["trained_through"] = "the language model alone (a text dataset has no images)"
    elif adapter.family == multimodal.LLAVA:
        info["trained_through"] = "text alone (a text dataset has no images): the vision tower's adapters stay zero"
    info.update({"seq_len": seq_len, "num_tokens": tokens.numel()})
    return TrainingData(CAUSAL_LM, lm, batch, info)


def _image_text(adapter: multimodal.ModelAdapter, tokenizer: Any, dataset: str, batch_size: int, seq_len: int,
                seed: int, info: dict[str, Any], archive_limits: ArchiveLimits) -> TrainingData:
    records = images.load_image_text(dataset, "train", archive_limits)
    contrastive = adapter.family == multimodal.CLIP
    if contrastive and len(set(records.texts)) < 2:
        raise JobError("dataset_error", f"{info['dataset']} has fewer than two distinct captions; a contrastive "
                                        "batch needs at least two.")
    text_len = multimodal.text_length(adapter, seq_len)
    size = multimodal.image_size(adapter)

    def batch(step: int) -> Batch:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed + step)).tolist()
        chosen = _distinct_captions(order, records.texts, batch_size) if contrastive else order[:batch_size]
        picked: Any = (records.images[chosen] if isinstance(records.images, torch.Tensor)
                       else [records.images[index] for index in chosen])
        text, mask = multimodal.caption_ids(adapter, tokenizer, [records.texts[index] for index in chosen],
                                            text_len)
        inputs = multimodal.calibration_inputs(adapter, text, images.pixel_values(picked, size), mask)
        tensors = dict(inputs.tensors)
        if contrastive:
            return Batch(tensors)
        # LLaVA, BLIP-2: placeholders and padding predict nothing; the caption's tokens are the targets.
        ids = tensors["input_ids"]
        labels = ids.masked_fill((tensors["attention_mask"] == 0) | (ids == adapter.model.config.image_token_id),
                                 IGNORE_INDEX)
        return Batch({**tensors, **inputs.options}, labels=labels)

    info["num_records"] = len(records)
    if contrastive:
        info["batch_pairs"] = min(batch_size, len(set(records.texts)))
    return TrainingData(CONTRASTIVE if contrastive else CAUSAL_LM, adapter.model, batch, info)


def _name(dataset: str) -> str:
    # The engine sees an upload as a scratch path; its file name is what a message can show.
    return dataset if dataset.startswith("builtin:") else Path(dataset).name


def _distinct_captions(order: list[int], texts: list[str], count: int) -> list[int]:
    """The first `count` records of `order` whose captions differ: two pairs with the same caption in one
    contrastive batch would each be told that the other's image is the wrong one."""
    chosen: list[int] = []
    seen: set[str] = set()
    for index in order:
        if texts[index] not in seen:
            seen.add(texts[index])
            chosen.append(index)
            if len(chosen) == count:
                break
    return chosen
