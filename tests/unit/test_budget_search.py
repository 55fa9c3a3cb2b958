"""The budget search as a pure function (workers/pruning/budget_search.py): the grid, bisection over it against
fake quality curves with hand-checked answers, its probe bound, its edges, and the engine's own checks of a
budget spec; then the engine's budget path on tiny models (restoration of the chosen model, a CLIP accuracy bound).
The search through the service, checked against a sweep, is tests/integration/test_budget_job.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.pruning import budget_search
from workers.pruning.budget_search import Bound, Probe, bound_of, grid, judge, max_probes, run_search, search
from workers.pruning.checks import check_spec
from workers.pruning.pipeline import run
from workers.pruning.spec import (
    BudgetSpec,
    CalibrationSpec,
    EvaluationSpec,
    JobError,
    Progress,
    PruneSpec,
    RestoreSpec,
)

DEFAULT = BudgetSpec(max_perplexity_ratio=1.5)  # 0.1 to 0.9 by 0.01


def _perplexity() -> Bound:
    return Bound("perplexity", 1.5, 10.0)


def test_the_grid_runs_from_min_by_step_and_ends_at_max() -> None:
    points = grid(0.1, 0.9, 0.01)
    assert len(points) == 81 and points[0] == 0.1 and points[-1] == 0.9
    assert points[37] == 0.47  # rounded to 6 places: 0.1 + 37 * 0.01 is 0.47000000000000003
    # A max off the step is kept as the last point; min == max is a grid of one.
    assert grid(0.1, 0.95, 0.1) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    assert grid(0.3, 0.3, 0.01) == [0.3]
    with pytest.raises(JobError):
        grid(0.5, 0.4, 0.01)


def test_max_probes_is_ceil_log2_of_points_plus_one() -> None:
    assert [max_probes(n) for n in (1, 2, 3, 4, 7, 8, 81, 1000)] == [1, 2, 2, 3, 3, 4, 7, 10]


def test_bisection_on_a_monotone_curve_finds_the_hand_computed_edge() -> None:
    # perplexity 10 * e^s against a dense 10: ratio e^s <= 1.5 while s <= ln 1.5 = 0.405465.
    # e^0.40 = 1.4918 is within, e^0.41 = 1.5068 is not: 0.40 is the answer.
    outcome = run_search(DEFAULT, _perplexity(), lambda s: 10 * math.exp(s))
    assert outcome.chosen is not None and outcome.chosen.sparsity == 0.4
    # Hand-followed: indices (-1, 81) -> 40 (0.5 out) -> 19 (0.29 in) -> 29 (0.39 in) -> 34 (0.44 out)
    # -> 31 (0.41 out) -> 30 (0.40 in): six probes, at most ceil(log2 82) = 7.
    assert [p.sparsity for p in outcome.probes] == [0.5, 0.29, 0.39, 0.44, 0.41, 0.4]
    assert [p.within for p in outcome.probes] == [False, True, True, False, False, True]
    assert outcome.probes[-1].measure == round(math.exp(0.4), 6)
    record = outcome.record(DEFAULT)
    assert record["chosen_sparsity"] == 0.4 and record["num_probes"] == 6
    assert record["bound"] == {"max_perplexity_ratio": 1.5} and record["dense"] == 10.0
    assert record["range"] == {"min_sparsity": 0.1, "max_sparsity": 0.9, "step": 0.01, "num_points": 81}
    assert [p["sparsity"] for p in record["probes"]] == [0.29, 0.39, 0.4, 0.41, 0.44, 0.5]  # lowest first
    assert record["probes"][2] == {"sparsity": 0.4, "perplexity": 10 * math.exp(0.4),
                                   "ratio": round(math.exp(0.4), 6), "within": True}


def test_every_edge_of_a_monotone_curve_is_found_within_the_probe_bound() -> None:
    points = grid(0.1, 0.9, 0.01)
    for edge in range(-1, len(points)):  # -1: nothing within; len - 1: everything
        def probe(s: float, edge: int = edge) -> Probe:
            return Probe(s, s, s, points.index(s) <= edge)

        chosen, made = search(points, probe)
        assert len(made) <= max_probes(len(points)) == 7
        assert len({p.sparsity for p in made}) == len(made)  # nothing probed twice
        if edge < 0:
            assert chosen is None and made[-1].sparsity == points[0]  # the lowest was probed, and failed
            continue
        assert chosen is not None and chosen.sparsity == points[edge]
        # The answer was probed within, and the next point (when there is one) probed outside.
        if edge + 1 < len(points):
            assert any(p.sparsity == points[edge + 1] and not p.within for p in made)


def test_a_curve_that_is_not_monotone_still_ends_on_a_probed_edge() -> None:
    # Within below 0.3, outside at 0.3 to 0.6, within again above: bisection first tries 0.5 (out), so it settles
    # on the lower edge 0.29/0.30: the answer is within, its next point outside, as the record shows.
    points = grid(0.1, 0.9, 0.01)
    chosen, made = search(points, lambda s: Probe(s, s, s, not 0.3 <= s <= 0.6))
    assert chosen is not None and chosen.sparsity == 0.29
    assert any(p.sparsity == 0.3 and not p.within for p in made)


def test_an_accuracy_drop_equal_to_the_bound_is_within() -> None:
    # accuracy 0.9 - s / 10 against a dense 0.9: the drop s / 10 <= 0.02 up to s = 0.2, where 0.9 - 0.88 is
    # 0.020000000000000018 in floating point: the slack keeps it within.
    bound = Bound("accuracy", 0.02, 0.9)
    outcome = run_search(BudgetSpec(max_accuracy_drop=0.02), bound, lambda s: 0.9 - s / 10)
    assert outcome.chosen is not None and outcome.chosen.sparsity == 0.2
    assert outcome.record(BudgetSpec(max_accuracy_drop=0.02))["chosen"] == {
        "sparsity": 0.2, "accuracy": 0.9 - 0.02, "drop": 0.02, "within": True}


def test_nothing_measurable_is_outside_the_bound() -> None:
    assert judge(_perplexity(), 0.5, None) == Probe(0.5, None, None, False)
    assert judge(_perplexity(), 0.5, math.inf) == Probe(0.5, None, None, False)
    assert judge(_perplexity(), 0.5, 15.0).within  # exactly 1.5x
    assert not judge(_perplexity(), 0.5, 15.001).within


def test_an_unreachable_budget_fails_naming_the_bound_and_the_best_probe() -> None:
    outcome = run_search(BudgetSpec(max_perplexity_ratio=1.5, min_sparsity=0.3, max_sparsity=0.7, step=0.1),
                         _perplexity(), lambda s: 10 * (2 + s))  # ratio 2 + s: always above 1.5
    assert outcome.chosen is None
    assert [p.sparsity for p in outcome.probes] == [0.5, 0.3]  # grid 0.3..0.7: middle index 2, then 0
    error = outcome.unreachable()
    assert error.code == "budget_unreachable"
    assert error.message == (
        "No sparsity from 0.3 to 0.7 keeps the perplexity at most 1.5x the dense model's (10): the best probe, at "
        "sparsity 0.3, has perplexity 23, 2.3x the dense model's. Lower budget.min_sparsity or loosen "
        "budget.max_perplexity_ratio.")


def test_the_bound_needs_its_metric_measured_on_the_dense_model() -> None:
    assert bound_of(DEFAULT, {"perplexity": {"dense": 12.5}}) == Bound("perplexity", 1.5, 12.5)
    assert bound_of(BudgetSpec(max_accuracy_drop=0.05), {"accuracy": {"dense": 0.8}}) == Bound("accuracy", 0.05, 0.8)
    with pytest.raises(JobError, match=r"budget.max_accuracy_drop needs the zero-shot accuracy") as error:
        bound_of(BudgetSpec(max_accuracy_drop=0.05), {"perplexity": {"dense": 12.5}})
    assert error.value.code == "invalid_spec"
    with pytest.raises(JobError, match=r"budget.max_perplexity_ratio: the dense model's perplexity is not"):
        bound_of(DEFAULT, {"perplexity": {"dense": None}})


def test_probe_messages_say_what_was_measured_and_the_verdict() -> None:
    probe = judge(_perplexity(), 0.47, 14.2)
    assert budget_search.probe_message(_perplexity(), probe, 3, 7) == (
        "Probe 3 of at most 7: sparsity 0.47: perplexity 14.2, 1.42x the dense model's: within the bound (1.5x).")


@pytest.mark.parametrize(("changes", "message"), [
    ({"budget": BudgetSpec()}, "exactly one bound"),
    ({"budget": BudgetSpec(max_perplexity_ratio=1.5, max_accuracy_drop=0.1)}, "exactly one bound"),
    ({"budget": BudgetSpec(max_perplexity_ratio=1.0)}, "must be above 1"),
    ({"budget": BudgetSpec(max_perplexity_ratio=1.5, min_sparsity=0.6, max_sparsity=0.5)}, "min_sparsity <="),
    ({"budget": DEFAULT, "sweep": (0.5, 0.6)}, "cannot be combined with a sweep"),
    ({"budget": DEFAULT, "targets": {"language": 0.5}}, "cannot be combined"),
    ({"budget": DEFAULT, "pattern": "2:4"}, "a budget has nothing to search"),
])
def test_the_engine_refuses_a_budget_no_run_could_carry_out(changes: dict[str, object], message: str) -> None:
    spec = PruneSpec(model_dir=Path("unused"), method="wanda", sparsity=0.5, **changes)  # type: ignore[arg-type]
    with pytest.raises(JobError, match=message):
        check_spec(spec)


# --- the engine's budget path on real tiny models -----------------------------------------------------------------


def test_a_budget_job_restores_only_the_chosen_model(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    # A bound every sparsity keeps: bisection climbs to max_sparsity, whose probe is the last one made, so the model
    # in memory is kept (not pruned again) and restored; the probes are measured before restoration.
    events: list[Progress] = []
    spec = PruneSpec(model_dir=tiny_llama_dir, method="magnitude", sparsity=0.1,
                     calibration=CalibrationSpec(dataset=str(small_text), num_samples=4, seq_len=32),
                     evaluation=EvaluationSpec(num_samples=2, seq_len=32),
                     budget=BudgetSpec(max_perplexity_ratio=1e6, min_sparsity=0.3, max_sparsity=0.8, step=0.05),
                     restore=RestoreSpec(steps=2, lr=1e-3, warmup_steps=0.5))
    result = run(spec, tmp_path / "out", on_progress=events.append)
    budget = result.metrics["budget"]
    assert budget["chosen_sparsity"] == 0.8 and budget["num_probes"] == 4  # indices 5, 8, 9, 10 of 0..10
    assert [p["sparsity"] for p in budget["probes"]] == [0.55, 0.7, 0.75, 0.8]
    assert sum(e.stage == "pruning" and e.done == 0 for e in events) == 4  # the chosen model was not pruned again
    assert sum(e.stage == "restoring" and e.done == 0 and "before" not in e.message for e in events) == 1
    restored = result.metrics["restore"]
    assert restored["perplexity_before"] == budget["chosen"]["perplexity"]
    assert restored["mask_preserved"] and restored["sparsity_after_merge"] == pytest.approx(0.8, abs=1e-3)
    assert result.metrics["sparsity"]["target"] == 0.8
    assert result.report["budget"] == budget and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_clip_budget_holds_zero_shot_accuracy(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    spec = PruneSpec(model_dir=tiny_model("clip"), method="magnitude", sparsity=0.1,
                     budget=BudgetSpec(max_accuracy_drop=0.99, min_sparsity=0.5, max_sparsity=0.6, step=0.1))
    result = run(spec, tmp_path / "out")
    budget = result.metrics["budget"]
    assert budget["metric"] == "accuracy" and budget["dense"] == result.metrics["accuracy"]["dense"]
    assert budget["chosen_sparsity"] == 0.6 and [p["sparsity"] for p in budget["probes"]] == [0.5, 0.6]
    assert all(p["drop"] == round(budget["dense"] - p["accuracy"], 6) for p in budget["probes"])
    # A perplexity bound on CLIP (which the API refuses for a local model) fails on the worker, readably.
    with pytest.raises(JobError, match="budget.max_perplexity_ratio needs the perplexity") as error:
        run(PruneSpec(model_dir=tiny_model("clip"), method="magnitude", sparsity=0.1,
                      budget=BudgetSpec(max_perplexity_ratio=1.5)), tmp_path / "again")
    assert error.value.code == "invalid_spec"
