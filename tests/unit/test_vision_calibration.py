"""Vision towers calibrate on real image-text data (builtin:digits, uploaded .zip); CLIP jobs report zero-shot
accuracy; llava-smollm2 is assembled from a real LM and digits-clip's vision tower."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from app.api.jobs import check_dataset_fits_model
from app.capabilities import capabilities
from app.errors import Problem
from app.schemas import JobCreate
from prunekit.fixtures.clip_tokenizer import END_OF_TEXT_ID, START_OF_TEXT_ID
from prunekit.fixtures.demo_models import IMAGE_TOKEN
from prunekit.fixtures.vlm_fixtures import FIXTURE_FILE, build_llava_smollm2
from workers.pruning import multimodal
from workers.pruning.images import BUILTIN_DIGITS, digits_split, pixel_values, read_image_text_zip
from workers.pruning.models import find_towers, load_model, prunable_layers
from workers.pruning.pipeline import run
from workers.pruning.spec import CalibrationSpec, EvaluationSpec, JobError, PruneSpec

SMALL_EVAL = EvaluationSpec(num_samples=2, seq_len=32)


def small_spec(model_dir: Path, dataset: str, **overrides: object) -> PruneSpec:
    fields: dict[str, object] = {"model_dir": model_dir, "method": "wanda", "sparsity": 0.5,
                                 "calibration": CalibrationSpec(dataset=dataset, num_samples=8, seq_len=32),
                                 "evaluation": SMALL_EVAL}
    return PruneSpec(**{**fields, **overrides})  # type: ignore[arg-type]


def image_text_zip(path: Path) -> Path:
    """Six pictures of different sizes and colours, with captions of different lengths, as an upload."""
    records = []
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(6):
            buffer = io.BytesIO()
            Image.new("RGB", (20 + 7 * index, 40 - 3 * index), (40 * index, 200 - 30 * index, 90)).save(buffer, "PNG")
            archive.writestr(f"images/{index}.png", buffer.getvalue())
            records.append({"image": f"images/{index}.png", "text": "a red square " * (index + 1)})
        archive.writestr("data.jsonl", "\n".join(json.dumps(record) for record in records) + "\n")
    return path


# ---- quality on digits-clip ----------------------------------------------------------------------------


def test_wanda_keeps_digits_clip_accurate_where_magnitude_at_high_sparsity_does_not(digits_clip_dir: Path,
                                                                                  tmp_path: Path) -> None:
    # The calibration dataset is left at its default: a CLIP model then calibrates on builtin:digits.
    wanda = run(PruneSpec(model_dir=digits_clip_dir, method="wanda", sparsity=0.3), tmp_path / "wanda")
    data = wanda.report["data"]
    assert data["dataset"] == BUILTIN_DIGITS and data["images"] == BUILTIN_DIGITS
    assert data["dataset_requested"] == "builtin:wiki-en" and data["num_samples"] == 64
    accuracy = wanda.metrics["accuracy"]
    assert wanda.report["accuracy"] == accuracy and "perplexity" not in wanda.metrics
    assert accuracy["dense"] > 0.85
    assert accuracy["pruned"] >= accuracy["dense"] - 0.03, accuracy

    magnitude = run(PruneSpec(model_dir=digits_clip_dir, method="magnitude", sparsity=0.7,
                              calibration=CalibrationSpec(dataset=BUILTIN_DIGITS)), tmp_path / "magnitude")
    lost = magnitude.metrics["accuracy"]
    assert lost["dense"] == accuracy["dense"]
    assert lost["pruned"] < lost["dense"] - 0.2 and lost["pruned"] < accuracy["pruned"] - 0.2, (accuracy, lost)


def test_accuracy_can_be_switched_off(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    result = run(small_spec(tiny_model("clip"), BUILTIN_DIGITS,
                            evaluation=EvaluationSpec(accuracy=False, num_samples=2, seq_len=32)), tmp_path / "out")
    assert "accuracy" not in result.metrics and "evaluation_dense" not in result.metrics["timings_s"]


# ---- which images calibrate ----------------------------------------------------------------------------


def test_an_uploaded_image_text_zip_calibrates_clip(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    upload = image_text_zip(tmp_path / "data.zip")
    source = tiny_model("clip")
    loaded = load_model(source)
    info: dict[str, object] = {}
    inputs = multimodal.image_text_inputs(loaded.model, loaded.tokenizer,
                                          CalibrationSpec(dataset=str(upload), num_samples=8, seq_len=32), info)
    assert inputs.num_samples == 6 and info["num_samples"] == 6  # the whole upload: fewer pairs than asked
    records = read_image_text_zip(upload)
    expected = pixel_values(records.images, 32)
    # All six images, in a seeded order: each calibration image is one of the upload's, each used once.
    matches = [[bool(torch.equal(row, image)) for image in expected] for row in inputs.tensors["pixel_values"]]
    assert sorted(row.index(True) for row in matches) == list(range(6))
    mask = inputs.tensors["attention_mask"]
    lengths = sorted(min(32, len(loaded.tokenizer(text)["input_ids"])) for text in records.texts)  # seq_len cuts
    assert sorted(mask.sum(dim=1).tolist()) == lengths and lengths[0] < lengths[-1]

    result = run(small_spec(source, str(upload)), tmp_path / "out")
    assert result.report["data"]["images"] == "data.zip" and result.report["data"]["kind"] == "image-text"
    assert result.metrics["sparsity"]["per_tower"] == {"vision": 0.5, "language": 0.5}
    assert set(result.metrics["accuracy"]) == {"dense", "pruned"}


def test_llava_captions_follow_the_image_placeholders(tiny_model: Callable[[str], Path]) -> None:
    loaded = load_model(tiny_model("llava"))
    info: dict[str, object] = {}
    inputs = multimodal.image_text_inputs(loaded.model, loaded.tokenizer,
                                          CalibrationSpec(dataset=BUILTIN_DIGITS, num_samples=5, seq_len=32), info)
    ids = inputs.tensors["input_ids"]
    image_token = loaded.model.config.image_token_id
    assert (ids[:, :16] == image_token).all() and not (ids[:, 16:] == image_token).any()
    mask = inputs.tensors["attention_mask"]
    assert mask[:, :16].all()
    # Captions are right-padded to the longest; the mask covers each one's own tokens only.
    captions = [loaded.tokenizer.decode(row[16:][keep[16:].bool()]) for row, keep in zip(ids, mask, strict=True)]
    train = digits_split("train")
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:5]
    assert torch.equal(inputs.tensors["pixel_values"], pixel_values(train.images[chosen], 32))
    assert captions == [f"a photo of the digit {train.labels[i]}" for i in chosen.tolist()]


def test_clip_captions_keep_the_markers_its_text_tower_pools_at(digits_clip_dir: Path) -> None:
    loaded = load_model(digits_clip_dir)
    ids, mask = multimodal.caption_ids(loaded.model, loaded.tokenizer, ["a photo of the digit 3", "a"], 16)
    assert ids[0].tolist() == loaded.tokenizer("a photo of the digit 3")["input_ids"]
    assert ids[1, 0] == START_OF_TEXT_ID and ids[1, 2] == END_OF_TEXT_ID and mask[1].tolist() == [1] * 3 + [0] * 5


def test_a_text_dataset_falls_back_to_synthetic_images(tiny_model: Callable[[str], Path], small_text: Path,
                                                       tmp_path: Path) -> None:
    result = run(small_spec(tiny_model("llava"), str(small_text)), tmp_path / "out")
    data = result.report["data"]
    assert data["images"] == "synthetic" and "images_note" in data and data["kind"] == "text"
    assert set(result.metrics["perplexity"]) == {"dense", "pruned"} and "accuracy" not in result.metrics


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_a_text_only_model_refuses_image_text_data(method: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = small_spec(tiny_llama_dir, BUILTIN_DIGITS, method=method, evaluation=EvaluationSpec(perplexity=False))
    with pytest.raises(JobError) as info:
        run(spec, tmp_path / "out")
    assert info.value.code == "dataset_error" and "image-text" in info.value.message
    assert not (tmp_path / "out").exists()


# ---- llava-smollm2 -------------------------------------------------------------------------------------


def test_llava_smollm2_joins_a_real_lm_and_digits_clip_vision(tiny_llama_dir: Path, digits_clip_dir: Path,
                                                              tmp_path: Path) -> None:
    """Built from the tiny Llama to stay small; `prunekit models import llava-smollm2` uses the real SmolLM2."""
    from transformers import AutoProcessor

    dest = tmp_path / "llava-smollm2"
    build_llava_smollm2(dest, tiny_llama_dir, digits_clip_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", FIXTURE_FILE):
        assert (dest / name).is_file(), name
    loaded = load_model(dest)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert multimodal.adapt(model).family == "llava" and [t.name for t in find_towers(model)] == ["vision", "language"]
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_id
    processor = AutoProcessor.from_pretrained(dest)
    prompt = processor(images=[Image.new("RGB", (8, 8))], text=[f"{IMAGE_TOKEN} a photo"], return_tensors="pt")
    assert int((prompt["input_ids"] == model.config.image_token_id).sum()) == 16  # (32 / 8)^2 patches

    clip = load_model(digits_clip_dir).model.vision_model.state_dict()
    assert all(torch.equal(value, clip[key]) for key, value in model.model.vision_tower.state_dict().items())
    llama = load_model(tiny_llama_dir).model
    vocab = llama.config.vocab_size
    for key, value in llama.model.state_dict().items():
        mine = model.model.language_model.state_dict()[key]
        assert torch.equal(mine[:vocab] if key == "embed_tokens.weight" else mine, value), key

    build_llava_smollm2(tmp_path / "again", tiny_llama_dir, digits_clip_dir)  # the seeded projector repeats
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (dest / "model.safetensors").read_bytes()

    result = run(small_spec(dest, BUILTIN_DIGITS, targets={"vision": 0.5, "language": 0.5},
                            evaluation=EvaluationSpec(perplexity=False)), tmp_path / "out")
    assert result.report["data"]["images"] == BUILTIN_DIGITS
    assert set(result.metrics["sparsity"]["per_layer"]) == set(prunable_layers(model))


# ---- the API's side ------------------------------------------------------------------------------------


def test_api_knows_builtin_digits_and_the_accuracy_flag() -> None:
    assert {"id": "builtin:digits", "kind": "image-text"} in capabilities()["datasets"]
    job = JobCreate.model_validate({"model": "local:digits-clip", "method": "wanda", "sparsity": 0.5,
                                    "calibration": {"dataset": "builtin:digits"}, "evaluation": {"accuracy": False}})
    assert job.calibration.dataset == "builtin:digits" and job.evaluation.accuracy is False
    assert JobCreate.model_validate({"model": "local:x", "method": "wanda", "sparsity": 0.5}).evaluation.accuracy


def test_api_refuses_image_text_data_for_a_local_text_only_model(tiny_model: Callable[[str], Path],
                                                                 tiny_llama_dir: Path) -> None:
    settings = SimpleNamespace(models_root=tiny_llama_dir.parent)
    with pytest.raises(Problem) as info:
        check_dataset_fits_model(settings, f"local:{tiny_llama_dir.name}", "image-text")  # type: ignore[arg-type]
    assert info.value.status == 422 and info.value.param == "calibration.dataset"
    check_dataset_fits_model(settings, f"local:{tiny_llama_dir.name}", "text")  # type: ignore[arg-type]
    clip = tiny_model("clip")
    check_dataset_fits_model(SimpleNamespace(models_root=clip.parent), f"local:{clip.name}",  # type: ignore[arg-type]
                             "image-text")
    check_dataset_fits_model(settings, "hf:org/name", "image-text")  # type: ignore[arg-type]  # the worker decides
