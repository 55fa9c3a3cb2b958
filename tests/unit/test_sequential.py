import math

import pytest
import torch

from tests.unit.conftest import tiny_llama_from_config
from workers.pruning.methods import get_method, wanda
from workers.pruning.models import block_linears, find_blocks, prunable_layers
from workers.pruning.patterns import layer_prune_count
from workers.pruning.sequential import Callbacks, Feed, Pruning, capture_block_inputs, prune_sequential
from workers.pruning.spec import JobCancelled

WINDOWS = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))


def dense_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_every_row_loses_floor_or_ceil_s_in_and_every_layer_round_s_size(method: str, sparsity: float) -> None:
    model = tiny_llama_from_config()
    before = dense_state(model)
    _, blocks = find_blocks(model)
    prune_sequential(model, blocks, Pruning(get_method(method), sparsity), Feed(WINDOWS, batch_size=4))
    layers = prunable_layers(model)
    for name, layer in layers.items():
        zeros_per_row = (layer.weight == 0).sum(dim=1)
        floor = math.floor(sparsity * layer.in_features + 1e-9)
        assert ((zeros_per_row == floor) | (zeros_per_row == floor + 1)).all(), name
        assert int(zeros_per_row.sum()) == layer_prune_count(sparsity, *layer.weight.shape), name
        kept = layer.weight != 0
        assert torch.equal(layer.weight[kept], before[f"{name}.weight"][kept])  # survivors untouched
    for name, param in model.named_parameters():
        if name.removesuffix(".weight") not in layers:  # embeddings, norms and the LM head stay dense
            assert torch.equal(param, before[name]), name


def test_wanda_uses_the_inputs_of_the_already_pruned_model() -> None:
    """Reference: for block i, run the whole (partly pruned) model and hook block i's Linears directly."""
    sparsity = 0.5
    model, reference = tiny_llama_from_config(), tiny_llama_from_config()
    _, blocks = find_blocks(model)
    prune_sequential(model, blocks, Pruning(get_method("wanda"), sparsity), Feed(WINDOWS, batch_size=3))

    for block in find_blocks(reference)[1]:
        linears = block_linears(block)
        stats = {name: wanda.InputNorms(layer.in_features) for name, layer in linears.items()}
        handles = [layer.register_forward_hook(lambda _m, args, _o, s=stats[name]: s.add(args[0]))
                   for name, layer in linears.items()]
        with torch.inference_mode():
            for batch in WINDOWS.split(3):
                reference(batch, use_cache=False)
        for handle in handles:
            handle.remove()
        for name, layer in linears.items():
            layer.weight.data *= wanda.mask(layer.weight.data, stats[name].norms(), sparsity)

    for (name, ours), theirs in zip(prunable_layers(model).items(), prunable_layers(reference).values(),
                                    strict=True):
        assert torch.equal(ours.weight == 0, theirs.weight == 0), name


def test_capture_collects_every_window_and_the_block_arguments() -> None:
    model = tiny_llama_from_config()
    _, blocks = find_blocks(model)
    with torch.inference_mode():
        hidden, batch_args = capture_block_inputs(model, blocks[0], WINDOWS, batch_size=4)
        embedded = model.model.embed_tokens(WINDOWS)
    assert hidden.shape == (6, 32, 64) and torch.equal(hidden, embedded)
    assert len(batch_args) == 2  # batches of 4 and 2
    assert "position_embeddings" in batch_args[0][1]


def test_cancel_stops_before_the_next_block() -> None:
    model = tiny_llama_from_config()
    _, blocks = find_blocks(model)
    done: list[int] = []
    with pytest.raises(JobCancelled):
        prune_sequential(model, blocks, Pruning(get_method("magnitude"), 0.5), Feed(None),
                         Callbacks(on_block=lambda d, _t: done.append(d), should_cancel=lambda: len(done) >= 1))
    assert done == [1]
    assert (blocks[0].mlp.up_proj.weight == 0).any() and not (blocks[1].mlp.up_proj.weight == 0).any()


def test_weights_stay_ordinary_tensors_after_pruning() -> None:
    # Later stages (fine-tuning) need autograd on these weights: inference-mode tensors would refuse.
    model = tiny_llama_from_config()
    _, blocks = find_blocks(model)
    prune_sequential(model, blocks, Pruning(get_method("wanda"), 0.5), Feed(WINDOWS))
    assert not any(p.is_inference() for p in model.parameters())
    model(WINDOWS[:1]).logits.sum().backward()
