"""Zero-shot classification accuracy of a CLIP-style model: each image takes the class whose prompt is closest.

The model needs only get_image_features(pixel_values=...) and get_text_features(input_ids, attention_mask),
as transformers' CLIPModel has; similarity is the cosine of the projected embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.pruning.images import digit_prompts, digits_split, pixel_values
from workers.pruning.spec import JobCancelled


def _never() -> bool:
    return False


def zero_shot_predictions(model: nn.Module, tokenizer: Any, images: torch.Tensor, prompts: Sequence[str],
                          batch_size: int = 256, should_cancel: Callable[[], bool] = _never) -> torch.Tensor:
    """Index of the best-matching prompt per image, [N] int64 on the CPU (ties go to the lower index)."""
    parameter = next(model.parameters())
    device = parameter.device
    dtype = parameter.dtype if parameter.is_floating_point() else torch.float32
    with torch.inference_mode():
        tokens = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        text = F.normalize(_features(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                             attention_mask=tokens["attention_mask"].to(device)))
                           .float(), dim=-1)
        predictions = []
        for batch in images.split(max(1, batch_size)):
            if should_cancel():
                raise JobCancelled("cancelled during zero-shot evaluation")
            image = _features(model.get_image_features(pixel_values=batch.to(device=device, dtype=dtype)))
            # Similarities in fp32: half-precision cosines tie too often between close prompts.
            predictions.append((F.normalize(image.float(), dim=-1) @ text.T).argmax(dim=-1).cpu())
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def zero_shot_accuracy(model: nn.Module, tokenizer: Any, images: torch.Tensor, labels: Sequence[int],
                       prompts: Sequence[str], batch_size: int = 256,
                       should_cancel: Callable[[], bool] = _never) -> float:
    """Fraction of images whose closest prompt is prompts[label]; images are CLIP pixel_values [N, 3, S, S]."""
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("zero-shot accuracy needs at least one image")
    predicted = zero_shot_predictions(model, tokenizer, images, prompts, batch_size, should_cancel)
    return float((predicted == torch.as_tensor(list(labels), dtype=torch.long)).float().mean())


def digits_zero_shot_accuracy(model: nn.Module, tokenizer: Any, split: str = "heldout", batch_size: int = 256,
                              should_cancel: Callable[[], bool] = _never) -> float:
    """The benchmark metric of digits-clip: accuracy on a builtin:digits split with the ten digit prompts."""
    data = digits_split(split)
    image_size = int(model.config.vision_config.image_size)
    images = pixel_values(data.images, image_size)
    return zero_shot_accuracy(model, tokenizer, images, data.labels or [], digit_prompts(), batch_size,
                              should_cancel)


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x the tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output
