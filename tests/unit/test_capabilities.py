"""GET /v1/capabilities says what the engine runs: every name it lists is one the engine's registries hold, and
the engine holds no name it does not list. The API takes its lists from the vocabulary (it never imports the
engine); this test is where the two are held together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app import capabilities as api
from app.capabilities import capabilities
from prunekit.fixtures import demo_models
from prunekit.vocabulary import BUILTIN_DATASETS, DIGITS, IMAGE_TEXT, WIKI_EN, fixed_sparsity
from workers.pruning import images, restore
from workers.pruning.allocation import ALLOCATIONS
from workers.pruning.data import load_text
from workers.pruning.methods import METHODS, get_method
from workers.pruning.models import MULTIMODAL_CLASSES, TOWERS, find_towers, load_model
from workers.pruning.patterns import parse_pattern, select_mask
from workers.pruning.spec import JobError, RestoreSpec

CAPS = capabilities()


def test_methods_and_allocations_are_the_engines_registries() -> None:
    assert CAPS["methods"] == list(METHODS)
    assert CAPS["allocations"] == list(ALLOCATIONS)
    for name in CAPS["methods"]:
        assert get_method(name).name == name


@pytest.mark.parametrize("pattern", CAPS["patterns"])
def test_every_pattern_is_one_the_engine_prunes_with(pattern: str) -> None:
    parse_pattern(pattern)  # raises for a pattern the engine does not know
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    kept = select_mask(scores, 0.25, pattern).float().mean().item()
    fixed = fixed_sparsity(pattern)
    # An N:M pattern prunes 1 - n/m whatever is asked; unstructured prunes what is asked.
    assert kept == pytest.approx(1 - (0.25 if fixed is None else fixed))


def test_every_restoration_passes_the_engines_check_and_no_other() -> None:
    for method in CAPS["restorations"]:
        restore.check(RestoreSpec(method=method), offload=False)
    with pytest.raises(JobError, match="not available"):
        restore.check(RestoreSpec(method="qlora"), offload=False)


def test_every_model_family_has_a_tiny_model_the_engine_loads(tmp_path: Path) -> None:
    towers: set[str] = set()
    for family in CAPS["model_families"]:
        build = getattr(demo_models, f"build_tiny_{family.replace('-', '')}")
        build(tmp_path / family)
        assert json.loads((tmp_path / family / "config.json").read_text())["model_type"] == family
        found = find_towers(load_model(tmp_path / family).model)
        assert found, family
        towers |= {tower.name for tower in found}
    # Every tower a job's targets may name (the API's list) is one some family has, and the engine knows no other.
    assert towers == set(TOWERS) == set(api.TOWERS)


def test_vision_families_are_the_engines_multimodal_classes() -> None:
    assert set(api.VISION_MODEL_TYPES) == set(MULTIMODAL_CLASSES)
    assert set(api.VISION_MODEL_TYPES) <= set(CAPS["model_families"])


def test_builtin_datasets_are_the_ones_the_engine_reads() -> None:
    assert CAPS["datasets"] == [{"id": k, "kind": v} for k, v in BUILTIN_DATASETS.items()]
    for dataset in CAPS["datasets"]:
        assert images.is_image_text(dataset["id"]) == (dataset["kind"] == IMAGE_TEXT)
    assert len(images.load_image_text(DIGITS)) > 0
    assert load_text(WIKI_EN)
