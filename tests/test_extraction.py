"""The trace reads only what it needs: early stop, slice shapes, server-side sums."""

from __future__ import annotations

import gc

import torch

from ndif_vectors.datasets import ABItem
from ndif_vectors.extraction import longest_first, make_batch, run_batches_locally
from ndif_vectors.models import find_layers
from ndif_vectors.prompts import EncodedPair, PromptFormat, encode_items


def _batch(model, n_items=3):
    items = [ABItem(f"Question {i}?" + " more" * i, "(A)", "(B)") for i in range(n_items)]
    pairs = encode_items(items, model.tokenizer, PromptFormat.CHAT)
    return make_batch(pairs, model.tokenizer.pad_token_id)


def test_left_padding_and_positions(smollm2):
    batch = _batch(smollm2)
    assert batch.input_ids.shape[0] == 6
    assert bool(batch.attention_mask[:, -1].all())
    short_row = int(batch.attention_mask.sum(dim=1).argmin())
    first_real = int(batch.attention_mask[short_row].nonzero()[0])
    assert first_real > 0
    assert batch.position_ids[short_row, first_real] == 0
    assert batch.position_ids[short_row, -1] == batch.attention_mask[short_row].sum() - 1


def test_forward_stops_after_last_layer(smollm2):
    calls = {"lm_head": 0, "layer_5": 0}
    module = smollm2._module
    hooks = [
        module.lm_head.register_forward_hook(lambda *args: calls.__setitem__("lm_head", calls["lm_head"] + 1)),
        module.model.layers[5].register_forward_hook(lambda *args: calls.__setitem__("layer_5", calls["layer_5"] + 1)),
    ]
    try:
        results = run_batches_locally(smollm2, find_layers(smollm2), [0, 3], [_batch(smollm2)], -2, "slices")
    finally:
        for hook in hooks:
            hook.remove()
    assert results[0].slices.shape == (6, 2, 576)
    assert calls == {"lm_head": 0, "layer_5": 0}


def test_sum_reduction_equals_slices(smollm2):
    batch = _batch(smollm2, n_items=4)
    stack = find_layers(smollm2)
    sliced = run_batches_locally(smollm2, stack, [2, 10, 29], [batch], -2, "slices")[0]
    summed = run_batches_locally(smollm2, stack, [2, 10, 29], [batch], -2, "sum")[0]
    expected = (sliced.slices[:4] - sliced.slices[4:]).sum(dim=0)
    assert summed.difference_sum.shape == (3, 576)
    assert summed.difference_sum.dtype == torch.float32
    assert torch.allclose(summed.difference_sum, expected, atol=1e-5)
    assert summed.finite.tolist() == [True] * 4


def test_longest_first_orders_by_longer_prompt():
    lengths = [(5, 5), (9, 7), (3, 8), (9, 9), (8, 3), (2, 2)]
    pairs = [EncodedPair(index, [1] * positive, [1] * negative) for index, (positive, negative) in enumerate(lengths)]
    # Longer prompt of each pair: 5, 9, 8, 9, 8, 2; ties keep dataset order.
    assert [pair.index for pair in longest_first(pairs)] == [1, 3, 2, 4, 0, 5]


def test_local_trace_frees_hidden_states(smollm2):
    stack = find_layers(smollm2)
    gc.collect()
    run_batches_locally(smollm2, stack, [0, 3], [_batch(smollm2, n_items=4)], -2, "slices")
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        stranded = [obj for obj in gc.garbage if isinstance(obj, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    # The early stop leaves reference cycles that hold every read block's hidden states until a
    # full collection, which a process with a model loaded rarely runs.
    assert stranded == []
