"""Steering evaluation on the real SmolLM2 with a refusal vector built from the CAA generate split."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from ndif_vectors import datasets
from ndif_vectors.datasets import DatasetError
from ndif_vectors.pipeline import RunConfig, generate_vectors
from ndif_vectors.prompts import PromptFormat
from ndif_vectors.steering import (
    SteeringError,
    encode_eval_items,
    evaluate_steering,
    make_eval_batch,
)
from test_analysis import _app

LAYER = 16
"""A middle layer of SmolLM2's 30 where the refusal vector moves the score both ways."""
MULTIPLIER = 4.0
N_GENERATE_ITEMS = 150


@pytest.fixture(scope="module")
def refusal_run(smollm2, model_dirs, caa_data, tmp_path_factory):
    """A refusal vector at ``LAYER`` from the first 150 items of the generate split, chat format."""
    out = tmp_path_factory.mktemp("vectors")
    config = RunConfig(model=str(model_dirs["smollm2"]), dataset=caa_data / "refusal" / "generate_dataset.json",
                       layers=str(LAYER), limit=N_GENERATE_ITEMS, batch_size=10, out_dir=out)
    return generate_vectors(config, model=smollm2)


@pytest.fixture(scope="module")
def refusal_vectors(refusal_run) -> dict[int, torch.Tensor]:
    return {LAYER: refusal_run.vectors[0]}


@pytest.fixture(scope="module")
def test_items(caa_data):
    return datasets.load_dataset(caa_data / "refusal" / "test_dataset_ab.json")


def test_score_follows_multiplier_sign(smollm2, refusal_vectors, test_items):
    assert len(test_items) == 50
    result = evaluate_steering(smollm2, refusal_vectors, test_items, [LAYER], [-MULTIPLIER, 0.0, MULTIPLIER],
                               batch_size=10)
    negative, unsteered, positive = (result.score(LAYER, m) for m in (-MULTIPLIER, 0.0, MULTIPLIER))
    measured = f"layer {LAYER}: score {negative:.4f} at -{MULTIPLIER:g}, {unsteered:.4f} at 0, {positive:.4f} at +{MULTIPLIER:g}"
    assert positive > unsteered, measured
    assert negative < unsteered, measured
    assert result.probabilities.shape == (1, 3, 50, 2)


def _plain_probabilities(smollm2, batch, hook=None, layer=LAYER) -> torch.Tensor:
    """Letter probabilities from the HF module itself, optionally with a forward hook on ``layer``."""
    module = smollm2._module
    handle = module.model.layers[layer].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, logits_to_keep=1).logits[:, -1, :]
    finally:
        if handle:
            handle.remove()
    return torch.softmax(logits.float(), dim=-1).gather(1, batch.letter_ids)


def _small_batch(smollm2, test_items, positions="answer"):
    prompts = encode_eval_items(test_items[:4], smollm2.tokenizer, PromptFormat.CHAT)
    prompts.sort(key=lambda prompt: len(prompt.ids))  # the order evaluate_steering batches them in
    return prompts, make_eval_batch(prompts, smollm2.tokenizer.pad_token_id, positions)


def test_multiplier_zero_matches_plain_forward(smollm2, refusal_vectors, test_items):
    result = evaluate_steering(smollm2, refusal_vectors, test_items[:4], [LAYER], [0.0], batch_size=4)
    prompts, batch = _small_batch(smollm2, test_items)
    expected = _plain_probabilities(smollm2, batch)
    steered = result.probabilities[0, 0, [prompt.index for prompt in prompts]]
    assert torch.equal(steered, expected), f"max difference {(steered - expected).abs().max():.3e}"


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_vector_added_once_per_forward(smollm2, refusal_vectors, test_items, positions):
    vector = refusal_vectors[LAYER]
    result = evaluate_steering(smollm2, refusal_vectors, test_items[:4], [LAYER], [MULTIPLIER], batch_size=4,
                               positions=positions)
    prompts, batch = _small_batch(smollm2, test_items, positions)
    steered = result.probabilities[0, 0, [prompt.index for prompt in prompts]]

    def hook_adding(times: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            for _ in range(times):
                hidden += MULTIPLIER * batch.steer_mask[:, :, None] * vector
            return output

        return hook

    once = _plain_probabilities(smollm2, batch, hook_adding(1))
    twice = _plain_probabilities(smollm2, batch, hook_adding(2))
    assert torch.allclose(steered, once, atol=1e-6), f"max difference {(steered - once).abs().max():.3e}"
    assert (steered - twice).abs().max() > 1e-3, "adding once and twice give the same probabilities"


def test_answer_positions_are_the_last_token(smollm2, test_items):
    prompts, batch = _small_batch(smollm2, test_items)
    assert [prompt.answer_length for prompt in prompts] == [1, 1, 1, 1]
    assert batch.steer_mask.sum(dim=1).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert batch.steer_mask[:, -1].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert smollm2.tokenizer.decode(batch.input_ids[0, -1:]) == "("
    letters = {(prompt.matching_letter, smollm2.tokenizer.decode([prompt.matching_token])) for prompt in prompts}
    assert letters <= {("A", "A"), ("B", "B")}


def test_vectors_of_another_model_are_rejected(smollm2, test_items):
    with pytest.raises(SteeringError, match=r"shape \[64\], but the model's hidden size is 576"):
        evaluate_steering(smollm2, {LAYER: torch.ones(64)}, test_items[:2], [LAYER], [1.0])


def test_layer_without_vector_is_rejected(smollm2, refusal_vectors, test_items):
    with pytest.raises(SteeringError, match=r"Layer 13 has no vector; the vectors cover layers \[16\]"):
        evaluate_steering(smollm2, refusal_vectors, test_items[:2], [13], [1.0])


def test_empty_test_set_is_rejected(smollm2, refusal_vectors, tmp_path):
    with pytest.raises(SteeringError, match="The test set has no items"):
        evaluate_steering(smollm2, refusal_vectors, [], [LAYER], [1.0])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DatasetError, match=f"{empty} is empty"):
        datasets.load_dataset(empty)


def test_cli_eval_writes_tables_and_plots(refusal_run, caa_data, tmp_path):
    out = tmp_path / "eval"
    completed = CliRunner().invoke(_app(), [
        "eval", "--vectors", str(refusal_run.paths.directory),
        "--dataset", str(caa_data / "refusal" / "test_dataset_ab.json"),
        "--layers", str(LAYER), "--multipliers", "-1,0,1", "--limit", "3", "--out", str(out),
    ])
    assert completed.exit_code == 0, completed.output
    stem = f"eval_refusal_{refusal_run.paths.model_name}"
    document = json.loads((out / f"{stem}.json").read_text())
    assert document["settings"]["multipliers"] == [-1.0, 0.0, 1.0]
    assert document["settings"]["positions"] == "answer"
    assert document["settings"]["prompt_format"] == "chat"
    assert len(document["summary"]) == 3
    assert len(document["items"]) == 9
    with open(out / f"{stem}_items.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 9
    assert {"layer", "multiplier", "item", "p_matching", "p_not_matching", "score"} <= set(rows[0])
    for suffix in ("multipliers", "layers"):
        assert (out / f"{stem}_{suffix}.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_missing_layer_exits_one(refusal_run, caa_data, tmp_path):
    completed = CliRunner().invoke(_app(), [
        "eval", "--vectors", str(refusal_run.paths.directory),
        "--dataset", str(caa_data / "refusal" / "test_dataset_ab.json"),
        "--layers", "3", "--limit", "1", "--out", str(tmp_path),
    ])
    assert completed.exit_code == 1
    assert "Layer 3 has no vector" in completed.output
    assert "Traceback" not in completed.output
