import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.pruning.pipeline import run
from workers.pruning.spec import (
    STAGES,
    CalibrationSpec,
    EvaluationSpec,
    JobCancelled,
    JobError,
    Progress,
    PruneSpec,
)


def spec_for(model_dir: Path, dataset: Path, **overrides: object) -> PruneSpec:
    fields: dict[str, object] = {
        "model_dir": model_dir, "method": "wanda", "sparsity": 0.5,
        "calibration": CalibrationSpec(dataset=str(dataset), num_samples=4, seq_len=64),
        "evaluation": EvaluationSpec(num_samples=4, seq_len=64),
    }
    return PruneSpec(**{**fields, **overrides})  # type: ignore[arg-type]


def test_run_prunes_reports_and_saves_a_loadable_folder(tiny_llama_dir: Path, small_text: Path,
                                                       tmp_path: Path) -> None:
    events: list[Progress] = []
    out = tmp_path / "out"
    result = run(spec_for(tiny_llama_dir, small_text), out, on_progress=events.append)

    # Scoring (a non-uniform allocation), budget_search (a budget) and restoring (restore) are stages of jobs that
    # ask for them.
    assert [e.stage for e in events if e.done == 0] == [s for s in STAGES
                                                        if s not in ("scoring", "budget_search", "restoring")]
    assert [(e.done, e.total) for e in events if e.stage == "pruning"] == [(0, 2), (1, 2), (2, 2)]

    metrics = result.metrics
    assert set(metrics) == {"sparsity", "perplexity", "timings_s", "peak_memory_mb", "memory", "num_parameters",
                            "num_pruned_parameters"}
    assert metrics["memory"]["mode"] == "memory" and metrics["memory"]["chosen_by"] == "job"
    assert metrics["sparsity"]["target"] == 0.5 and metrics["sparsity"]["achieved"] == 0.5
    assert len(metrics["sparsity"]["per_layer"]) == 14
    assert set(metrics["perplexity"]) == {"dense", "pruned"}
    assert set(metrics["timings_s"]) == {"loading", "calibration", "evaluation_dense", "pruning",
                                         "evaluation_pruned", "saving"}
    assert metrics["peak_memory_mb"] > 0 and metrics["num_pruned_parameters"] > 0
    report = json.loads(json.dumps(result.report))  # JSON-able as it is
    assert report["sparsity"] == metrics["sparsity"] and report["spec"]["method"] == "wanda"
    assert {"torch", "transformers", "device", "threads"} <= set(report["environment"])
    assert len(report["layers"]) == 14 and {"name", "shape", "numel", "zeros", "sparsity", "block"} <= set(
        report["layers"][0])

    assert result.output_dir == out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    saved = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for name, param in saved.named_parameters():
        reference = dict(dense.named_parameters())[name]
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert float((param == 0).float().mean()) == 0.5, name
        else:
            assert torch.equal(param, reference), name
    assert AutoTokenizer.from_pretrained(out)("hello")["input_ids"]


def test_magnitude_without_evaluation_needs_no_data(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = spec_for(tiny_llama_dir, tmp_path / "missing.txt", method="magnitude", sparsity=0.7,
                    evaluation=EvaluationSpec(perplexity=False))
    result = run(spec, tmp_path / "out")
    assert "perplexity" not in result.metrics
    assert set(result.metrics["timings_s"]) == {"loading", "pruning", "saving"}
    # Every layer round(0.7 * size) zeros: within half a weight per layer of the target.
    assert result.metrics["sparsity"]["achieved"] == pytest.approx(0.7, abs=1e-4)


def test_cancel_raises_and_saves_nothing(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    stages: list[Progress] = []
    with pytest.raises(JobCancelled):
        run(spec_for(tiny_llama_dir, small_text), tmp_path / "out", on_progress=stages.append,
            should_cancel=lambda: stages[-1].stage == "pruning" if stages else False)
    assert stages[-1].stage == "pruning" and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("overrides", "code"), [
    ({"method": "obc"}, "unsupported_method"),
    ({"pattern": "2-4"}, "unsupported_pattern"),
    ({"sparsity": 1.0}, "invalid_spec"),
    ({"calibration": CalibrationSpec(dataset="builtin:nope")}, "dataset_error"),
    ({"evaluation": EvaluationSpec(num_samples=10_000, seq_len=512)}, "dataset_error"),
])
def test_readable_failures(tiny_llama_dir: Path, small_text: Path, tmp_path: Path,
                           overrides: dict[str, object], code: str) -> None:
    with pytest.raises(JobError) as info:
        run(spec_for(tiny_llama_dir, small_text, **overrides), tmp_path / "out")
    assert info.value.code == code and info.value.message


def test_missing_model_folder(tmp_path: Path, small_text: Path) -> None:
    with pytest.raises(JobError) as info:
        run(spec_for(tmp_path / "nope", small_text), tmp_path / "out")
    assert info.value.code == "model_load_failed"


def test_a_sweep_reports_every_tower_it_pruned(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    # The job's own sparsity (the lowest) is pruned first; the report describes it although later sparsities
    # reloaded the model, so its towers are the planned ones by name, not the same objects.
    result = run(spec_for(tiny_llama_dir, small_text, method="magnitude", sparsity=0.3, sweep=(0.3, 0.6),
                          evaluation=EvaluationSpec(perplexity=False)), tmp_path)
    assert [row["sparsity"] for row in result.metrics["sweep"]] == [0.3, 0.6]
    assert [(t["name"], t["pruned"]) for t in result.report["model"]["towers"]] == [("language", True)]
