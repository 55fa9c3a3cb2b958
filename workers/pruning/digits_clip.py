"""digits-clip: a small CLIPModel the project trains itself, deterministically, on builtin:digits.

No real CLIP weights can be had offline, so this is the stand-in with real behaviour to lose when pruned:
a ViT image tower and a causal text tower over the real 49408-token CLIP vocabulary, trained with a
contrastive loss on the digits train split and scored by zero-shot accuracy on the held-out split.

Training runs on CPU in one thread with deterministic algorithms, so a recipe gives the same weights on
every run of the same torch build. The result is cached: a folder whose fingerprint file matches the
recipe (and the library versions) is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workers.pruning.clip_tokenizer import (
    CLIP_VOCAB_SIZE,
    END_OF_TEXT_ID,
    START_OF_TEXT_ID,
    build_clip_tokenizer,
    save_clip_tokenizer,
)
from workers.pruning.demo_models import write_atomically
from workers.pruning.images import CLIP_MEAN, CLIP_STD, digit_prompts, digits_split, pixel_values

FINGERPRINT_FILE = "digits_clip.fingerprint.json"
FORMAT_VERSION = 1  # bump whenever the training code changes what a recipe produces


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    image_size: int = 32
    patch_size: int = 8  # 4x4 patches of 2x2 digit cells: 17 vision tokens keep training to a minute or two
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4  # per tower
    num_heads: int = 4
    projection_dim: int = 64
    max_position_embeddings: int = 16  # "a photo of the digit N" is 8 tokens with its markers
    logit_scale_init: float = 2.6592  # ln(1/0.07), CLIP's initial temperature
    epochs: int = 20
    batch_size: int = 64
    # Above ~1e-3 the text tower collapses at the start (all ten prompts embed alike) and never recovers.
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    max_shift: int = 1  # random translation, in digit cells, so the image tower does not memorise positions


def build_digits_clip(dest: Path, recipe: Recipe = Recipe(),
                      log: Callable[[str], None] = lambda message: None) -> bool:
    """Train digits-clip into dest (an HF folder); False when dest already holds this recipe's model."""
    fingerprint = recipe_fingerprint(recipe)
    if _cached_fingerprint(dest) == fingerprint:
        return False
    model = train_digits_clip(recipe, log)
    write_atomically(dest, lambda tmp: _save(model, recipe, fingerprint, tmp))
    return True


def recipe_fingerprint(recipe: Recipe) -> str:
    import transformers

    # Another torch or transformers may round differently: their versions are part of what a build means.
    payload = {"format": FORMAT_VERSION, "recipe": asdict(recipe), "torch": torch.__version__,
               "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def clip_config(recipe: Recipe) -> Any:
    from transformers import CLIPConfig

    tower = {"hidden_size": recipe.hidden_size, "intermediate_size": recipe.intermediate_size,
             "num_hidden_layers": recipe.num_layers, "num_attention_heads": recipe.num_heads,
             "projection_dim": recipe.projection_dim}
    # eos_token_id must be the real <|endoftext|> id: the text tower pools at its first occurrence.
    text = {**tower, "vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": recipe.max_position_embeddings,
            "bos_token_id": START_OF_TEXT_ID, "eos_token_id": END_OF_TEXT_ID, "pad_token_id": END_OF_TEXT_ID}
    vision = {**tower, "image_size": recipe.image_size, "patch_size": recipe.patch_size, "num_channels": 3}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=recipe.projection_dim,
                      logit_scale_init_value=recipe.logit_scale_init)


def train_digits_clip(recipe: Recipe, log: Callable[[str], None] = lambda message: None) -> Any:
    """A CLIPModel trained on the digits train split; same recipe, same torch build -> same weights."""
    from transformers import CLIPModel

    train = digits_split("train")
    labels = torch.tensor(train.labels)
    tokenizer = build_clip_tokenizer(recipe.max_position_embeddings)
    prompts = tokenizer(digit_prompts(), padding=True, return_tensors="pt")
    with _deterministic(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = CLIPModel._from_config(clip_config(recipe))
        # Only ~10 of the 49408 token rows are ever used; training the table would cost more than the towers.
        # The used rows keep their random (distinct) vectors and the layers above learn to read them.
        model.text_model.embeddings.token_embedding.weight.requires_grad_(False)
        model.train()
        generator = torch.Generator().manual_seed(recipe.seed)
        steps_per_epoch = math.ceil(len(labels) / recipe.batch_size)
        optimizer, schedule = _optimizer(model, recipe, recipe.epochs * steps_per_epoch)
        for epoch in range(recipe.epochs):
            order = torch.randperm(len(labels), generator=generator)
            total = 0.0
            for batch in order.split(recipe.batch_size):
                images = _shifted(train.images[batch], recipe.max_shift, generator)
                loss = _contrastive_loss(model, pixel_values(images, recipe.image_size), labels[batch], prompts)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():  # CLIP caps its temperature at 100
                    model.logit_scale.clamp_(0.0, math.log(100.0))
                total += float(loss.detach()) * len(batch)
            log(f"epoch {epoch + 1}/{recipe.epochs}: loss {total / len(labels):.4f}")
    return model.eval()


def _contrastive_loss(model: Any, pixels: torch.Tensor, labels: torch.Tensor, prompts: Any) -> torch.Tensor:
    """CLIP's symmetric loss where every caption of an image's class counts as its positive.

    Captions repeat within a batch (ten classes), so one-hot targets would push an image away from its own
    class's caption; spreading the target over all same-class pairs removes those false negatives. Each
    distinct prompt is encoded once: identical captions have identical embeddings anyway.
    """
    image = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    text = F.normalize(_features(model.get_text_features(**prompts)), dim=-1)[labels]
    logits = model.logit_scale.exp() * image @ text.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is projected; 4.x returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _shifted(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to max_shift cells each way, the uncovered border blank (zero ink)."""
    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[index, :, top:top + size, left:left + size]
                        for index, (top, left) in enumerate(offsets)])


def _optimizer(model: torch.nn.Module, recipe: Recipe, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    # Norms, biases, embeddings and the temperature are not decayed, as in CLIP's own training.
    trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    decay = [param for name, param in trained if param.dim() >= 2 and "embedding" not in name]
    keep = [param for name, param in trained if not (param.dim() >= 2 and "embedding" not in name)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": keep, "weight_decay": 0.0}], lr=recipe.learning_rate)
    warmup = max(1, round(recipe.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextmanager
def _deterministic() -> Iterator[None]:
    """One thread and deterministic kernels: a different reduction split would change the low bits."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _save(model: Any, recipe: Recipe, fingerprint: str, folder: Path) -> None:
    from transformers import CLIPImageProcessorPil

    model.save_pretrained(folder, safe_serialization=True)
    save_clip_tokenizer(folder, recipe.max_position_embeddings)
    # No torchvision beside this torch: the PIL-backed processor is the one that loads everywhere.
    size = recipe.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                          image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(folder)
    record = {"fingerprint": fingerprint, "recipe": asdict(recipe), "format": FORMAT_VERSION}
    (folder / FINGERPRINT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _cached_fingerprint(dest: Path) -> str | None:
    try:
        record = json.loads((dest / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # The weights must still be there: a half-deleted folder is not a cache hit.
    if not (dest / "model.safetensors").is_file() or not isinstance(record, dict):
        return None
    return record.get("fingerprint")
