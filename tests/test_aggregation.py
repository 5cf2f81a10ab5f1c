"""Aggregation precision and the non-finite check."""

from __future__ import annotations

import pytest
import torch

from ndif_vectors.aggregation import MeanDifference, NonFiniteActivationError
from ndif_vectors.extraction import BatchResult


def test_bfloat16_slices_average_in_float64():
    generator = torch.Generator().manual_seed(0)
    n_items, d_model = 1000, 64
    positive = (torch.randn(n_items, 1, d_model, generator=generator) + 3).to(torch.bfloat16)
    negative = torch.randn(n_items, 1, d_model, generator=generator).to(torch.bfloat16)
    aggregate = MeanDifference([0], d_model)
    for start in range(0, n_items, 10):
        slices = torch.cat([positive[start:start + 10], negative[start:start + 10]])
        aggregate.add(BatchResult(list(range(start, start + 10)), slices=slices))
    exact = (positive.double() - negative.double()).mean(dim=0)
    assert aggregate.count == n_items
    assert (aggregate.mean().double() - exact).abs().max() < 1e-6

    # What a bfloat16 running sum would have given, to show the check above can fail.
    running = torch.zeros(1, d_model, dtype=torch.bfloat16)
    for row in range(n_items):
        running += positive[row] - negative[row]
    assert ((running.double() / n_items) - exact).abs().max() > 1e-3


def test_nan_names_item_side_and_layer():
    slices = torch.zeros(6, 2, 4)  # 3 items, positive rows 0-2, negative rows 3-5
    slices[4, 1, 2] = float("nan")  # item 1, negative prompt, second layer
    aggregate = MeanDifference([7, 9], 4)
    with pytest.raises(NonFiniteActivationError, match="Item 21 .*negative prompt at layer 9"):
        aggregate.add(BatchResult([20, 21, 22], slices=slices))


def test_infinite_sum_names_item():
    aggregate = MeanDifference([0], 4)
    finite = torch.tensor([True, True, False])
    with pytest.raises(NonFiniteActivationError, match="Item 12 "):
        aggregate.add(BatchResult([10, 11, 12], difference_sum=torch.zeros(1, 4), finite=finite))


def test_shape_mismatch_rejected():
    aggregate = MeanDifference([0, 1], 4)
    with pytest.raises(ValueError, match="expected \\(2, 4\\)"):
        aggregate.add(BatchResult([0], slices=torch.zeros(2, 3, 4)))
