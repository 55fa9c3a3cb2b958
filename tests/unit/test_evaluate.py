import math

import torch

from tests.unit.conftest import tiny_llama_from_config
from workers.pruning.evaluate import perplexity, sparsity_report

WINDOWS = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(1))


def test_perplexity_is_exp_of_the_mean_next_token_nll() -> None:
    model = tiny_llama_from_config()
    with torch.inference_mode():
        # Every window has the same length, so the mean of per-window mean losses is the mean over all tokens.
        losses = [float(model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss) for w in WINDOWS]
    expected = math.exp(sum(losses) / len(losses))
    for batch_size in (1, 2, 5):
        assert math.isclose(perplexity(model, WINDOWS, batch_size=batch_size), expected, rel_tol=1e-5)


def test_sparsity_report_counts_zeros_per_layer() -> None:
    model = tiny_llama_from_config()
    up = model.model.layers[1].mlp.up_proj
    up.weight.data[:, :43] = 0  # 43 of 64 inputs in every row
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    report = sparsity_report(model, names)
    assert report["per_layer"] == {names[0]: 0.0, names[1]: 43 / 64}
    assert report["achieved"] == 43 * 172 / (2 * 64 * 172)
    assert report["num_zeros"] == 43 * 172 and report["num_prunable_parameters"] == 2 * 64 * 172
    assert report["layers"][1] == {"name": names[1], "shape": [172, 64], "numel": 172 * 64, "zeros": 43 * 172,
                                   "sparsity": 43 / 64, "block": 1}


def test_perplexity_taken_a_few_positions_at_a_time_is_the_same(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from workers.pruning import evaluate

    model = tiny_llama_from_config()
    whole = perplexity(model, WINDOWS, batch_size=2)
    # 300 elements per chunk at vocab 256 and batch 2: one position per chunk, 23 chunks per window.
    monkeypatch.setattr(evaluate, "_LOSS_CHUNK_ELEMENTS", 300)
    assert math.isclose(perplexity(model, WINDOWS, batch_size=2), whole, rel_tol=1e-6)
    monkeypatch.setattr(evaluate, "_LOSS_CHUNK_ELEMENTS", 256 * 2 * 7)  # uneven: 7 positions, then the rest
    assert math.isclose(perplexity(model, WINDOWS, batch_size=2), whole, rel_tol=1e-6)
