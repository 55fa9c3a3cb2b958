"""llava-smollm2: a LLaVA-style model (LlavaForConditionalGeneration) around a real language model.

Its language tower is an imported causal LM (the real SmolLM2-135M for `prunekit models import
llava-smollm2`; any Llama-family HF folder works, which the tests use to stay small). Its vision tower is a
CLIP vision encoder: digits-clip's, trained, when that folder is given, otherwise a seeded random one of the
same shape. Only the projector between them is new, and seeded: nobody trained this pair together, so the
model is a structural stand-in that exercises per-tower pruning on a real LM, not a captioner.

Images are 32x32 with 8x8 patches, so an image is (32 / 8)^2 = 16 "<image>" placeholders in the text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from workers.pruning.demo_models import IMAGE_TOKEN, write_atomically
from workers.pruning.images import CLIP_MEAN, CLIP_STD
from workers.pruning.models import save_pretrained_folder

# A fresh vision tower has digits-clip's shape (digits_clip.Recipe), so both variants load and prune alike.
FRESH_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 128, "intermediate_size": 512,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_channels": 3}
FIXTURE_FILE = "llava_smollm2.json"


def build_llava_smollm2(dest: Path, language_dir: Path, vision_dir: Path | None = None, seed: int = 0) -> None:
    """The LLaVA folder: config, model.safetensors, tokenizer (with "<image>"), image processor, processor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(language_dir, trust_remote_code=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    language = AutoModelForCausalLM.from_pretrained(language_dir, dtype=torch.float32, trust_remote_code=False,
                                                    use_safetensors=True)
    vision_config, vision_weights = _vision_tower(vision_dir)
    with torch.random.fork_rng(devices=[]):  # seeded projector (and new embedding row), caller's RNG untouched
        torch.manual_seed(seed)
        if len(tokenizer) > language.get_input_embeddings().weight.shape[0]:
            language.resize_token_embeddings(len(tokenizer))
        model = _assemble(language, vision_config, vision_weights, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    processor = _processor(tokenizer, vision_config)
    record = {"language": language_dir.name, "vision": vision_dir.name if vision_dir else "seeded random",
              "seed": seed}

    def write(tmp: Path) -> None:
        save_pretrained_folder(model, tokenizer, tmp)
        processor.save_pretrained(tmp)
        (tmp / FIXTURE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    write_atomically(dest, write)


def _vision_tower(vision_dir: Path | None) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """(CLIPVisionConfig, the trained vision encoder's weights, or None for a fresh seeded tower)."""
    from transformers import CLIPModel, CLIPVisionConfig

    if vision_dir is None:
        return CLIPVisionConfig(**FRESH_VISION), None
    clip = CLIPModel.from_pretrained(vision_dir, dtype=torch.float32, trust_remote_code=False,
                                     use_safetensors=True)
    return clip.config.vision_config, clip.vision_model.state_dict()


def _assemble(language: Any, vision_config: Any, vision_weights: dict[str, torch.Tensor] | None,
              image_token_id: int) -> Any:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=language.config.to_dict(),
                         image_token_index=image_token_id, image_seq_length=patches, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=language.config.tie_word_embeddings)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.load_state_dict(language.lm_head.state_dict())
    if vision_weights is not None:
        model.model.vision_tower.load_state_dict(vision_weights)  # CLIPVisionModel holds the layers directly
    return model


def _processor(tokenizer: Any, vision_config: Any) -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    size = int(vision_config.image_size)
    # The PIL-backed processor: it loads without torchvision (as digits-clip's does).
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    # "default" drops the CLS feature: num_additional_image_tokens=1 tells the processor the tower emits one.
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=int(vision_config.patch_size),
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)

