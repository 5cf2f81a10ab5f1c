"""The contenders of the benchmark: five ways to get the same CAA vectors from one model.

Each contender is a function ``(setup, layers) -> Outcome``. Model loading happens once in
``Setup`` and is never timed. Every contender sees the same items, the same chat-format
token ids and reads index -2 (the answer letter of ``(A)``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ndif_vectors import RunConfig, generate_vectors
from ndif_vectors.extraction import Batch, longest_first, make_batch
from ndif_vectors.prompts import EncodedPair

READ_INDEX = -2


@dataclass
class Outcome:
    """What one timed run of a contender produced."""

    items: int
    vectors: torch.Tensor | None  # [n_layers, d_model] float32, None for the limit
    requests: int | None = None
    bytes_downloaded: int | None = None
    result_bytes: int | None = None  # decompressed size of the results


@dataclass
class Setup:
    """Models, token ids and strings shared by every contender; built once, outside the timing."""

    model_dir: Path
    dataset: Path
    items: int
    batch_size: int
    hf_model: torch.nn.Module  # plain transformers model, no nnsight wrapper
    tokenizer: object
    nnsight_model: object  # a second copy of the weights, wrapped by nnsight
    pairs: list[EncodedPair]
    texts: list[tuple[str, str]]  # (positive, negative) prompt strings
    pad_token_id: int
    remote_model: object | None = None
    remote_model_dir: str | None = None
    batches: list[Batch] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The batches that ndif-vectors itself runs: longest first, then cut.
        ordered = longest_first(self.pairs)
        self.batches = [
            make_batch(ordered[start: start + self.batch_size], self.pad_token_id)
            for start in range(0, len(ordered), self.batch_size)
        ]


class _StopForward(Exception):
    """Raised from a hook on the last needed block, so nothing after it runs."""


def run_limit(setup: Setup, layers: list[int]) -> Outcome:
    """Run a bare transformers forward pass over ndif-vectors' left-padded batches, up to the last needed layer.

    The hook on the last block reads nothing: it only ends the forward pass, so the
    final norm and the LM head never run, and no KV cache is kept. This is the cost of the
    forward computation alone.
    """
    def stop(module, inputs, output):
        raise _StopForward

    handle = setup.hf_model.model.layers[max(layers)].register_forward_hook(stop)
    try:
        with torch.no_grad():
            for batch in setup.batches:
                try:
                    setup.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   position_ids=batch.position_ids, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return Outcome(setup.items, None)


def run_caa_method(setup: Setup, layers: list[int]) -> Outcome:
    """The CAA script's method: one prompt per forward pass, the whole model, hooks on every layer.

    Same as tests/reference.py, but fed the chat-format ids that every other contender
    uses, and hooking only the requested layers.
    """
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [1, T, d_model]
            captured[layer] = hidden[0, READ_INDEX, :].detach().clone()
        return hook

    blocks = setup.hf_model.model.layers
    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    positive = {layer: [] for layer in layers}
    negative = {layer: [] for layer in layers}
    try:
        with torch.no_grad():
            for pair in setup.pairs:
                for ids, store in ((pair.positive, positive), (pair.negative, negative)):
                    setup.hf_model(torch.tensor([ids]))
                    for layer in layers:
                        store[layer].append(captured[layer])
    finally:
        for handle in handles:
            handle.remove()
    vectors = torch.stack([
        torch.stack(positive[layer]).mean(dim=0) - torch.stack(negative[layer]).mean(dim=0)
        for layer in layers
    ])
    return Outcome(setup.items, vectors)


def run_steering_vectors(setup: Setup, layers: list[int]) -> Outcome:
    """``steering_vectors.train_steering_vector`` on the prompt strings, at the same batch size.

    The library runs the positive and the negative prompts of a batch as two forward
    passes of ``batch_size`` rows each, with the tokenizer's own (right) padding.
    """
    from steering_vectors import train_steering_vector

    steering_vector = train_steering_vector(
        setup.hf_model, setup.tokenizer, setup.texts, layers=layers,
        read_token_index=READ_INDEX, batch_size=setup.batch_size, show_progress=False,
    )
    vectors = torch.stack([steering_vector.layer_activations[layer].float() for layer in layers])
    return Outcome(setup.items, vectors)


def _layer_spec(layers: list[int]) -> str:
    return ",".join(str(layer) for layer in layers)


def run_ndif_vectors_local(setup: Setup, layers: list[int]) -> Outcome:
    """``generate_vectors`` on the preloaded nnsight model; includes reading, encoding and writing files."""
    with tempfile.TemporaryDirectory(prefix="ndif-vectors-bench-") as out_dir:
        result = generate_vectors(
            RunConfig(model=str(setup.model_dir), dataset=setup.dataset, limit=setup.items,
                      layers=_layer_spec(layers), batch_size=setup.batch_size, out_dir=Path(out_dir),
                      prompt_format="chat", read_index=READ_INDEX),
            model=setup.nnsight_model,
        )
    return Outcome(setup.items, result.vectors.float(), result.manifest["requests"],
                   result.manifest["bytes_downloaded"])


def make_remote_contender(batches_per_request: int, reduce: str):
    """Return a contender that runs ``generate_vectors`` on the NDIF server of the local stack."""

    def run_remote(setup: Setup, layers: list[int]) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="ndif-vectors-bench-") as out_dir:
            result = generate_vectors(
                RunConfig(model=setup.remote_model_dir, remote=True, dataset=setup.dataset,
                          limit=setup.items, layers=_layer_spec(layers), batch_size=setup.batch_size,
                          batches_per_request=batches_per_request, reduce=reduce,
                          out_dir=Path(out_dir), prompt_format="chat", read_index=READ_INDEX),
                model=setup.remote_model,
            )
        return Outcome(setup.items, result.vectors.float(), result.manifest["requests"],
                       result.manifest["bytes_downloaded"], result.manifest.get("result_bytes"))

    return run_remote
