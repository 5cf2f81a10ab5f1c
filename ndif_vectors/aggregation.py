"""Aggregation of per-batch results into CAA steering vectors.

The vector of a layer is the mean over items of ``positive - negative`` activations.
The running sum is kept in float64 whatever the model dtype: a bfloat16 or float16
running sum loses most of its precision long before a thousand items.
"""

from __future__ import annotations

import torch

from .extraction import BatchResult


class NonFiniteActivationError(ValueError):
    """An activation slice that contains NaN or infinity."""


class MeanDifference:
    """Running mean of positive minus negative activations, ``[n_layers, d_model]``.

    Memory is ``O(n_layers x d_model)`` whatever the number of items.
    """

    def __init__(self, layers: list[int], d_model: int):
        self.layers = list(layers)
        self.d_model = d_model
        self.total = torch.zeros(len(layers), d_model, dtype=torch.float64)
        self.count = 0

    def add(self, result: BatchResult) -> None:
        """Add one batch; raise ``NonFiniteActivationError`` naming the first bad item."""
        n_items = len(result.item_indices)
        if result.slices is not None:
            slices = result.slices  # [2b, n_layers, d_model]
            self._check_shape(slices.shape[1:])
            positive, negative = slices[:n_items], slices[n_items:]
            finite = (
                torch.isfinite(positive).flatten(1).all(dim=1)
                & torch.isfinite(negative).flatten(1).all(dim=1)
            )
            self._check_finite(finite, result.item_indices, positive, negative)
            self.total += (positive.double() - negative.double()).sum(dim=0)
        elif result.difference_sum is not None:
            self._check_shape(result.difference_sum.shape)
            self._check_finite(result.finite, result.item_indices)
            self.total += result.difference_sum.double()
        else:
            raise ValueError("A batch result carries neither slices nor a difference sum.")
        self.count += n_items

    def _check_shape(self, shape) -> None:
        expected = (len(self.layers), self.d_model)
        if tuple(shape) != expected:
            raise ValueError(f"Batch result has shape {tuple(shape)}; expected {expected} (layers, d_model).")

    def _check_finite(self, finite: torch.Tensor, item_indices: list[int], positive=None, negative=None) -> None:
        if bool(finite.all()):
            return
        row = int((~finite).nonzero()[0, 0])
        detail = ""
        if positive is not None:
            side = "positive" if not torch.isfinite(positive[row]).all() else "negative"
            values = positive[row] if side == "positive" else negative[row]
            layer = self.layers[int((~torch.isfinite(values)).any(dim=-1).nonzero()[0, 0])]
            detail = f" in the {side} prompt at layer {layer}"
        raise NonFiniteActivationError(
            f"Item {item_indices[row]} has a NaN or infinite activation{detail}. "
            "Try --dtype float32, or check that item's text."
        )

    def mean(self) -> torch.Tensor:
        """Return the steering vectors, ``[n_layers, d_model]`` in float32."""
        if self.count == 0:
            raise ValueError("No items were aggregated.")
        return (self.total / self.count).float()

    def state_dict(self) -> dict:
        return {"total": self.total.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total = state["total"].to(torch.float64).clone()
        self.count = int(state["count"])
