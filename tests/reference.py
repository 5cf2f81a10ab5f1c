"""An independent CAA implementation for the tests, written the way the CAA paper's script works.

Plain transformers, no nnsight: forward hooks on every decoder layer, one prompt at a
time (batch size 1, no padding), the full forward pass, and ``[0, -2, :]`` kept per layer.
The vector of a layer is ``mean(positive) - mean(negative)`` over the dataset.
"""

from __future__ import annotations

import torch


def llama2_prompt(question: str, answer: str) -> str:
    return f"[INST] {question.strip()} [/INST] {answer.strip()}"


def reference_vectors(hf_model, tokenizer, blocks, items: list[dict], prompt=llama2_prompt) -> torch.Tensor:
    """Return ``[n_layers, d_model]`` CAA vectors for every block in ``blocks``."""
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden[0, -2, :].detach().clone()

        return hook

    handles = [block.register_forward_hook(make_hook(layer)) for layer, block in enumerate(blocks)]
    positive = {layer: [] for layer in range(len(blocks))}
    negative = {layer: [] for layer in range(len(blocks))}
    try:
        with torch.no_grad():
            for item in items:
                for answer, store in (
                    (item["answer_matching_behavior"], positive),
                    (item["answer_not_matching_behavior"], negative),
                ):
                    ids = tokenizer(prompt(item["question"], answer), return_tensors="pt").input_ids
                    hf_model(ids)
                    for layer in range(len(blocks)):
                        store[layer].append(captured[layer])
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([
        torch.stack(positive[layer]).mean(dim=0) - torch.stack(negative[layer]).mean(dim=0)
        for layer in range(len(blocks))
    ])
