"""Steering evaluation: add ``multiplier x vector`` to one layer's output and score A/B answers.

For every test item the prompt is rendered with the answer ``(`` so that the next token
is the answer letter. With the vector of layer ``L`` added to the output of decoder
block ``L`` (the residual stream), the next-token distribution gives ``p(matching)`` and
``p(not matching)`` for the item's two answer letters, and the behaviour score is
``p(matching) / (p(matching) + p(not matching))``, as in CAA's A/B evaluation.

The vector is added, once per forward pass, at the positions that ``positions`` selects:

* ``answer`` (CAA's choice): every token of the answer text, here the ``(``. Because
  every prompt ends with its answer and batches are left-padded, these are the last
  one or few positions of each row.
* ``all``: every non-padding token of the prompt.

The trace body refers only to tensors, ``torch`` and ``nnsight`` and saves only the
``[b, 2]`` letter probabilities, so that a remote run can pass ``remote=True`` (and a
backend) through ``trace_options``: NDIF serializes the block by source, and its server
cannot import this package.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nnsight
import torch

from .datasets import ABItem
from .models import LayerStack, find_layers
from .prompts import PromptError, PromptFormat, encode_prompt, render_prompt

logger = logging.getLogger(__name__)

POSITIONS = ("answer", "all")
OPEN_ANSWER = "("
"""The answer text of an evaluation prompt: the next token after it is the answer letter."""

EvalProgress = Callable[[int, int], None]
"""Called as ``progress(rows_done, rows_total)``; a row is one item at one layer and multiplier."""


class SteeringError(ValueError):
    """Vectors, layers or settings that cannot be used for a steering evaluation."""


@dataclass(frozen=True)
class EvalPrompt:
    """One test item tokenized for evaluation."""

    index: int
    ids: list[int]
    """The prompt rendered with the answer ``(``; it ends with the answer tokens."""
    answer_length: int
    """How many tokens at the end of ``ids`` belong to the answer text."""
    matching_letter: str
    not_matching_letter: str
    matching_token: int
    not_matching_token: int


@dataclass
class EvalBatch:
    """Left-padded model inputs for ``len(item_indices)`` evaluation prompts."""

    item_indices: list[int]
    input_ids: torch.Tensor  # [b, T]
    attention_mask: torch.Tensor  # [b, T]
    position_ids: torch.Tensor  # [b, T]
    steer_mask: torch.Tensor  # [b, T], float32: 1.0 where the vector is added
    letter_ids: torch.Tensor  # [b, 2]: matching, not matching letter token


@dataclass
class SweepResult:
    """Letter probabilities of a steering sweep over layers and multipliers."""

    layers: list[int]
    multipliers: list[float]
    positions: str
    prompts: list[EvalPrompt]
    probabilities: torch.Tensor  # [n_layers, n_multipliers, n_items, 2], float32: p(matching), p(not matching)
    settings: dict = field(default_factory=dict)

    @property
    def scores(self) -> torch.Tensor:
        """Behaviour score per item, ``[n_layers, n_multipliers, n_items]``.

        An item whose two letters both get probability 0 (possible only in float16 or
        bfloat16 underflow) scores NaN instead of raising.
        """
        matching, not_matching = self.probabilities.double().unbind(dim=-1)
        return (matching / (matching + not_matching)).float()

    @property
    def mean_scores(self) -> torch.Tensor:
        """Behaviour score averaged over items, ``[n_layers, n_multipliers]``."""
        return self.scores.double().nanmean(dim=-1).float()

    def score(self, layer: int, multiplier: float) -> float:
        """Return the mean behaviour score at one layer and multiplier."""
        return float(self.mean_scores[self.layers.index(layer), self.multipliers.index(multiplier)])


def answer_length(ids: list[int], question_ids: list[int]) -> int:
    """Return how many tokens at the end of ``ids`` are not shared with ``question_ids``.

    The answer may merge with the end of the question part (``"[/INST] "`` plus ``"("``
    can become one token ``" ("``), so the shared prefix is compared token by token.
    """
    shared = 0
    for token, other in zip(ids, question_ids):
        if token != other:
            break
        shared += 1
    return max(len(ids) - shared, 1)


def encode_eval_items(
    items: list[ABItem],
    tokenizer,
    prompt_format: PromptFormat,
    system_prompt: str | None = None,
) -> list[EvalPrompt]:
    """Tokenize each item's prompt that ends in ``(`` and find its two letter tokens.

    A letter's token is read from the full prompt ending in ``(A)``, so that it is the
    token the model would produce after ``(``. Raises ``PromptError`` where the
    tokenizer merges the letter with the parenthesis.
    """
    prompts = []
    for index, item in enumerate(items):
        text = render_prompt(item.question, OPEN_ANSWER, prompt_format, tokenizer, system_prompt)
        ids = encode_prompt(text, tokenizer)
        question_ids = encode_prompt(render_prompt(item.question, "", prompt_format, tokenizer, system_prompt),
                                     tokenizer)
        letters = {}
        for side, answer in (("matching", item.positive), ("not matching", item.negative)):
            full = encode_prompt(render_prompt(item.question, answer, prompt_format, tokenizer, system_prompt),
                                 tokenizer)
            letter = answer[1]
            token = full[len(ids)] if len(full) > len(ids) and full[: len(ids)] == ids else None
            if token is None or tokenizer.decode([token]).strip() != letter:
                raise PromptError(
                    f"Item {index} ({side} answer {answer}): the prompt ending in '(' is not a "
                    f"token prefix of the prompt ending in {answer!r}, or the next token is not "
                    f"the letter {letter!r}. The tokenizer merges the letter with the "
                    "parenthesis; use another --prompt-format."
                )
            letters[side] = (letter, token)
        prompts.append(EvalPrompt(
            index=index,
            ids=ids,
            answer_length=answer_length(ids, question_ids),
            matching_letter=letters["matching"][0],
            not_matching_letter=letters["not matching"][0],
            matching_token=letters["matching"][1],
            not_matching_token=letters["not matching"][1],
        ))
    return prompts


def make_eval_batch(prompts: list[EvalPrompt], pad_token_id: int, positions: str) -> EvalBatch:
    """Left-pad ``prompts`` into one batch and mark the positions that get the vector.

    Position ids count from each row's first real token, as in ``extraction.make_batch``.
    """
    width = max(len(prompt.ids) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    steer_mask = torch.zeros((len(prompts), width), dtype=torch.float32)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt.ids):] = torch.tensor(prompt.ids, dtype=torch.long)
        attention_mask[row, width - len(prompt.ids):] = 1
        first_steered = width - prompt.answer_length if positions == "answer" else width - len(prompt.ids)
        steer_mask[row, first_steered:] = 1.0
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    letter_ids = torch.tensor(
        [[prompt.matching_token, prompt.not_matching_token] for prompt in prompts], dtype=torch.long
    )
    return EvalBatch([prompt.index for prompt in prompts], input_ids, attention_mask, position_ids,
                     steer_mask, letter_ids)


def steered_letter_probabilities(model, envoy, batch: EvalBatch, vector: torch.Tensor, multiplier: float,
                                 trace_options: dict | None = None) -> torch.Tensor:
    """Run one traced forward pass with ``multiplier x vector`` added to ``envoy``'s output.

    Returns ``[b, 2]`` float32 probabilities of each row's matching and not-matching
    letter at the last position. ``trace_options`` go to ``model.trace``, with
    ``logits_to_keep=1`` added when the model's forward accepts it.
    """
    trace_options = dict(trace_options or {})
    if _accepts_logits_to_keep(model):
        # Only the last position's logits are read; this skips the LM head elsewhere.
        trace_options.setdefault("logits_to_keep", 1)
    scale = batch.steer_mask * float(multiplier)  # [b, T]
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    position_ids, letter_ids = batch.position_ids, batch.letter_ids

    # Only tensors and torch are used inside the block: it must run on an NDIF server.
    with model.trace(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     **trace_options):
        output = envoy.output
        # transformers 5 returns a tensor from a decoder block, 4 a tuple.
        hidden = output[0] if isinstance(output, tuple) else output  # [b, T, d_model]
        delta = scale.to(hidden.device)[:, :, None] * vector.to(hidden.device)  # [b, T, d_model], float32
        hidden += delta.to(hidden.dtype)
        logits = model.output.logits[:, -1, :]  # [b, vocab]
        probabilities = torch.softmax(logits.float(), dim=-1)
        letter_probabilities = nnsight.save(
            probabilities.gather(1, letter_ids.to(probabilities.device))  # [b, 2]
        )
    return letter_probabilities.detach().to("cpu", torch.float32)


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model._module.forward).parameters


def _model_device(model) -> torch.device:
    parameter = next(model._module.parameters(), None)
    if parameter is None or parameter.device.type == "meta":
        # A remote model has meta weights; its inputs travel from the CPU.
        return torch.device("cpu")
    return parameter.device


def validate_sweep(vectors: dict[int, torch.Tensor], layers: list[int], multipliers: list[float],
                   n_model_layers: int, d_model: int, n_items: int, positions: str, batch_size: int) -> None:
    """Raise ``SteeringError`` naming the first unusable setting."""
    if n_items == 0:
        raise SteeringError("The test set has no items; pass a dataset with at least one A/B item.")
    if not layers:
        raise SteeringError("No layers to evaluate; pass at least one layer, e.g. --layers 13.")
    if not multipliers:
        raise SteeringError("No multipliers to evaluate; pass at least one, e.g. --multipliers -1,0,1.")
    for multiplier in multipliers:
        if not math.isfinite(multiplier):
            raise SteeringError(f"Invalid multiplier {multiplier}: it must be a finite number.")
    if positions not in POSITIONS:
        raise SteeringError(f"Invalid positions {positions!r}; choose one of {', '.join(POSITIONS)}.")
    if batch_size < 1:
        raise SteeringError(f"Invalid batch size {batch_size}: it must be at least 1.")
    for layer in layers:
        if not 0 <= layer < n_model_layers:
            raise SteeringError(
                f"Invalid layer {layer}: the model has {n_model_layers} layers (0..{n_model_layers - 1})."
            )
        if layer not in vectors:
            raise SteeringError(
                f"Layer {layer} has no vector; the vectors cover layers {sorted(vectors)}. "
                "Choose layers from that list or build vectors for this layer with `ndif-vectors run`."
            )
        shape = tuple(vectors[layer].shape)
        if shape != (d_model,):
            raise SteeringError(
                f"The vector of layer {layer} has shape {list(shape)}, but the model's hidden size "
                f"is {d_model}: the vectors were built on another model. Pass the --model they were "
                "built with, or vectors built on this model."
            )
        if not torch.isfinite(vectors[layer]).all():
            raise SteeringError(f"The vector of layer {layer} contains NaN or infinite values.")


def evaluate_steering(
    model,
    vectors: dict[int, torch.Tensor],
    items: list[ABItem],
    layers: list[int],
    multipliers: list[float],
    *,
    prompt_format: PromptFormat | str = PromptFormat.CHAT,
    system_prompt: str | None = None,
    positions: str = "answer",
    batch_size: int = 8,
    progress: EvalProgress | None = None,
    trace_options: dict | None = None,
) -> SweepResult:
    """Score ``items`` with each layer's vector added at each multiplier.

    One trace runs per layer, multiplier and batch; ``trace_options`` (for example
    ``remote=True``) go to every ``model.trace`` call. Raises ``SteeringError`` for bad
    vectors or settings and ``PromptError`` for prompts whose letters cannot be scored.
    """
    from .pipeline import hidden_size

    stack: LayerStack = find_layers(model)
    d_model = hidden_size(model)
    multipliers = [float(multiplier) for multiplier in multipliers]
    validate_sweep(vectors, layers, multipliers, stack.count, d_model, len(items), positions, batch_size)

    tokenizer = model.tokenizer
    prompts = encode_eval_items(items, tokenizer, PromptFormat(prompt_format), system_prompt)
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    # Batches of similar lengths waste less compute on padding; results go back by row.
    by_length = sorted(range(len(prompts)), key=lambda row: len(prompts[row].ids))
    row_groups = [by_length[start: start + batch_size] for start in range(0, len(prompts), batch_size)]
    batches = [make_eval_batch([prompts[row] for row in rows], pad_token_id, positions) for rows in row_groups]

    device = _model_device(model)
    probabilities = torch.empty((len(layers), len(multipliers), len(prompts), 2), dtype=torch.float32)
    rows_total, rows_done = len(layers) * len(multipliers) * len(prompts), 0
    if progress:
        progress(rows_done, rows_total)
    with torch.no_grad():
        for layer_row, layer in enumerate(layers):
            envoy = stack.envoy(model, layer)
            vector = vectors[layer].detach().to(device, torch.float32)
            for multiplier_column, multiplier in enumerate(multipliers):
                for rows, batch in zip(row_groups, batches):
                    letter_probabilities = steered_letter_probabilities(
                        model, envoy, batch, vector, multiplier, trace_options
                    )
                    probabilities[layer_row, multiplier_column, rows] = letter_probabilities
                    rows_done += len(rows)
                    if progress:
                        progress(rows_done, rows_total)

    settings = {
        "layers": list(layers),
        "multipliers": multipliers,
        "positions": positions,
        "prompt_format": PromptFormat(prompt_format).value,
        "system_prompt": system_prompt,
        "batch_size": batch_size,
        "n_items": len(prompts),
        "n_model_layers": stack.count,
        "d_model": d_model,
        "vector_norms": {str(layer): float(vectors[layer].float().norm()) for layer in layers},
    }
    return SweepResult(list(layers), multipliers, positions, prompts, probabilities, settings)


# Output files


def write_sweep_tables(result: SweepResult, json_path: Path, summary_csv: Path, items_csv: Path,
                       settings: dict) -> list[Path]:
    """Write the sweep as one JSON file, a per-setting summary CSV and a per-item CSV."""
    from .storage import atomic_write, save_json

    scores, mean_scores = result.scores, result.mean_scores
    summary_rows, item_rows = [], []
    for layer_row, layer in enumerate(result.layers):
        for column, multiplier in enumerate(result.multipliers):
            probabilities = result.probabilities[layer_row, column]  # [n_items, 2]
            summary_rows.append({
                "layer": layer,
                "multiplier": multiplier,
                "positions": result.positions,
                "n_items": len(result.prompts),
                "mean_score": float(mean_scores[layer_row, column]),
                "mean_p_matching": float(probabilities[:, 0].mean()),
                "mean_p_not_matching": float(probabilities[:, 1].mean()),
            })
            for item_row, prompt in enumerate(result.prompts):
                item_rows.append({
                    "layer": layer,
                    "multiplier": multiplier,
                    "positions": result.positions,
                    "item": prompt.index,
                    "matching_letter": prompt.matching_letter,
                    "not_matching_letter": prompt.not_matching_letter,
                    "p_matching": float(probabilities[item_row, 0]),
                    "p_not_matching": float(probabilities[item_row, 1]),
                    "score": float(scores[layer_row, column, item_row]),
                })

    document = {"settings": {**result.settings, **settings}, "summary": summary_rows, "items": item_rows}
    written = [save_json(json_path, document)]
    for path, rows in ((summary_csv, summary_rows), (items_csv, item_rows)):
        def write(temporary: Path, rows=rows) -> None:
            with open(temporary, "w", newline="", encoding="utf-8") as stream:
                writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)

        written.append(atomic_write(path, write))
    return written


def plot_multiplier_sweep(result: SweepResult, path: Path, title: str) -> Path:
    """Plot the mean behaviour score against the multiplier, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    order = sorted(range(len(result.multipliers)), key=lambda column: result.multipliers[column])
    x = [result.multipliers[column] for column in order]
    for layer_row, layer in enumerate(result.layers):
        y = [float(result.mean_scores[layer_row, column]) for column in order]
        axes.plot(x, y, marker="o", label=f"layer {layer}")
    axes.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="p(matching) = p(not matching)")
    axes.set_xlabel("steering multiplier (x vector added to the layer output)")
    axes.set_ylabel("behaviour score: p(matching) / (p(matching) + p(not matching))")
    axes.yaxis.label.set_size(8)
    _set_score_limits(axes)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_layer_sweep(result: SweepResult, path: Path, title: str, multiplier: float) -> Path:
    """Plot the mean behaviour score against the layer at ``multiplier`` and its negative.

    The unsteered score (multiplier 0) is drawn as a reference when the sweep has it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    plotted = [multiplier]
    if -multiplier in result.multipliers and multiplier != 0:
        plotted.append(-multiplier)
    for value in plotted:
        column = result.multipliers.index(value)
        y = [float(result.mean_scores[layer_row, column]) for layer_row in range(len(result.layers))]
        axes.plot(result.layers, y, marker="o", label=f"multiplier {value:+g}")
    if 0.0 in result.multipliers and multiplier != 0:
        column = result.multipliers.index(0.0)
        y = [float(result.mean_scores[layer_row, column]) for layer_row in range(len(result.layers))]
        axes.plot(result.layers, y, color="grey", linestyle="--", label="unsteered (multiplier 0)")
    axes.set_xlabel("layer the vector is added to (decoder block output)")
    axes.set_ylabel("behaviour score: p(matching) / (p(matching) + p(not matching))")
    axes.yaxis.label.set_size(8)
    _set_score_limits(axes)
    axes.set_xticks(result.layers)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, path)


def _set_score_limits(axes) -> None:
    # Small models move the score by a few hundredths, which a fixed 0..1 axis hides;
    # the axis zooms to the data but never leaves the score's range.
    low, high = axes.get_ylim()
    axes.set_ylim(max(0.0, low), min(1.0, high))


def _save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from .storage import atomic_write

    try:
        return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    finally:
        plt.close(figure)
