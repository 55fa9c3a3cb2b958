"""The real model: on SmolLM2-135M, wanda must beat magnitude at 50%, and neither may beat the dense model."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from workers.pruning.pipeline import run
from workers.pruning.spec import CalibrationSpec, EvaluationSpec, PruneSpec, Result

CALIBRATION = CalibrationSpec(num_samples=8, seq_len=256)
EVALUATION = EvaluationSpec(num_samples=8, seq_len=256)


@pytest.fixture(scope="module")
def results(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Result]]:
    out = tmp_path_factory.mktemp("pruned")
    yield {method: run(PruneSpec(smollm2_dir, method, 0.5, calibration=CALIBRATION, evaluation=EVALUATION),
                       out / method)
           for method in ("magnitude", "wanda")}
    shutil.rmtree(out)


def test_imported_smollm2_matches_the_protocol(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text(encoding="utf-8"))
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config and not list(smollm2_dir.glob("*.gguf"))


def test_wanda_beats_magnitude_and_dense_beats_both(results: dict[str, Result]) -> None:
    magnitude, wanda = (results[m].metrics["perplexity"] for m in ("magnitude", "wanda"))
    assert magnitude["dense"] == wanda["dense"]
    assert wanda["dense"] < wanda["pruned"] < magnitude["pruned"]
    assert wanda["dense"] < 20  # the dequantised 4-bit weights still model English text


def test_smollm2_sparsity_is_exact_and_saved(results: dict[str, Result]) -> None:
    for result in results.values():
        metrics = result.metrics
        assert metrics["sparsity"]["achieved"] == 0.5  # 576 and 1536 inputs: floor(0.5 * in) is exact
        assert len(metrics["sparsity"]["per_layer"]) == 30 * 7
        assert metrics["num_parameters"] == 134_515_008
    saved = AutoModelForCausalLM.from_pretrained(results["wanda"].output_dir)
    assert float((saved.model.layers[29].mlp.down_proj.weight == 0).float().mean()) == 0.5
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()  # still tied, dense
