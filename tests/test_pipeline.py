"""End-to-end vectors on real models, checked against the independent reference."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ndif_vectors import datasets, models, storage
from ndif_vectors.extraction import longest_first, make_batch, run_batches_locally
from ndif_vectors.pipeline import RunConfig, generate_vectors
from ndif_vectors.prompts import PromptFormat, encode_items
from reference import reference_vectors


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)


def test_matches_reference_on_sycophancy(smollm2, model_dirs, caa_data, tmp_path):
    dataset = caa_data / "sycophancy" / "generate_dataset.json"
    config = RunConfig(model=str(model_dirs["smollm2"]), dataset=dataset, layers="all", limit=64,
                       prompt_format="llama2", batch_size=8, out_dir=tmp_path)
    result = generate_vectors(config, model=smollm2)

    hf_model = AutoModelForCausalLM.from_pretrained(model_dirs["smollm2"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["smollm2"])
    items = json.loads(dataset.read_text())[:64]
    expected = reference_vectors(hf_model, tokenizer, hf_model.model.layers, items)

    assert result.layers == list(range(30))
    cosine = _cosine(result.vectors, expected)
    relative = _relative_error(result.vectors, expected)
    assert cosine.min() >= 0.9999, f"cosine per layer: {cosine.tolist()}"
    assert relative.max() <= 1e-3, f"relative error per layer: {relative.tolist()}"


def test_batch_of_eight_equals_batch_of_one(smollm2, model_dirs, caa_data, tmp_path):
    dataset = caa_data / "refusal" / "generate_dataset.json"
    common = dict(model=str(model_dirs["smollm2"]), dataset=dataset, layers="0,7,15,29", limit=16)
    batched = generate_vectors(RunConfig(**common, batch_size=8, out_dir=tmp_path / "b8"), model=smollm2)
    single = generate_vectors(RunConfig(**common, batch_size=1, out_dir=tmp_path / "b1"), model=smollm2)
    difference = (batched.vectors - single.vectors).abs().max()
    assert difference <= 1e-4, f"max abs difference {difference:.3e}"
    assert _cosine(batched.vectors, single.vectors).min() >= 0.99999


def _mixed_length_dataset(path, caa_data) -> None:
    """Write items whose prompts range from a few tokens to several hundred."""
    long_items = json.loads((caa_data / "sycophancy" / "generate_dataset.json").read_text())[:4]
    short_items = [
        {"question": f"Pick {letter}.\n (A) yes\n (B) no", "answer_matching_behavior": "(A)",
         "answer_not_matching_behavior": "(B)"}
        for letter in "xyzw"
    ]
    mixed = [item for pair in zip(long_items, short_items) for item in pair]
    path.write_text(json.dumps(mixed))


def test_gpt2_batched_equals_unpadded_reference(tiny_gpt2, model_dirs, caa_data, tmp_path):
    """GPT-2 has absolute positions: padded rows are only right with mask-derived position ids."""
    dataset = tmp_path / "mixed" / "mixed.json"
    dataset.parent.mkdir()
    _mixed_length_dataset(dataset, caa_data)
    common = dict(model=str(model_dirs["tiny-gpt2"]), dataset=dataset, layers="all", prompt_format="llama2")
    batched = generate_vectors(RunConfig(**common, batch_size=8, out_dir=tmp_path / "b8"), model=tiny_gpt2)
    single = generate_vectors(RunConfig(**common, batch_size=1, out_dir=tmp_path / "b1"), model=tiny_gpt2)

    hf_model = AutoModelForCausalLM.from_pretrained(model_dirs["tiny-gpt2"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["tiny-gpt2"])
    expected = reference_vectors(hf_model, tokenizer, hf_model.transformer.h, json.loads(dataset.read_text()))

    assert (batched.vectors - single.vectors).abs().max() <= 1e-5
    assert (batched.vectors - expected).abs().max() <= 1e-5


def test_right_padding_tokenizer_gives_same_vectors(model_dirs, caa_data, tmp_path):
    dataset = tmp_path / "mixed" / "mixed.json"
    dataset.parent.mkdir()
    _mixed_length_dataset(dataset, caa_data)
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["tiny-gpt2"])
    common = dict(model=str(model_dirs["tiny-gpt2"]), dataset=dataset, layers="all", batch_size=8)

    left = generate_vectors(RunConfig(**common, out_dir=tmp_path / "left"))
    right_model = models.load_model(str(model_dirs["tiny-gpt2"]), tokenizer=tokenizer)
    # nnsight switches a causal model's tokenizer to left padding; set it back to the right.
    right_model.tokenizer.padding_side = "right"
    right = generate_vectors(RunConfig(**common, out_dir=tmp_path / "right"), model=right_model)
    assert right_model.tokenizer.padding_side == "right"
    assert (left.vectors - right.vectors).abs().max() <= 1e-5


def test_outputs_and_manifest(smollm2, model_dirs, caa_data, tmp_path):
    dataset = caa_data / "corrigible-neutral-HHH" / "generate_dataset.json"
    config = RunConfig(model=str(model_dirs["smollm2"]), dataset=dataset, layers="10-12", limit=6,
                       batch_size=4, out_dir=tmp_path, save_activations=True)
    result = generate_vectors(config, model=smollm2)
    directory = tmp_path / "corrigible-neutral-HHH"
    name = "smollm2-135m-instruct"

    bundle = storage.load_vectors(directory / f"vectors_{name}.safetensors")
    assert sorted(bundle) == [10, 11, 12]
    for row, layer in enumerate([10, 11, 12]):
        vector = torch.load(directory / f"vec_layer_{layer}_{name}.pt")
        assert vector.shape == (576,)
        assert vector.dtype == torch.float32
        assert torch.equal(vector, bundle[layer])
        assert torch.equal(vector, result.vectors[row])
        positive = torch.load(directory / f"activations_pos_{layer}_{name}.pt")
        negative = torch.load(directory / f"activations_neg_{layer}_{name}.pt")
        assert positive.shape == (6, 576)
        assert torch.allclose((positive - negative).mean(dim=0), vector, atol=1e-5)

    # Items run longest first, but the activation files keep dataset order: row i is item i.
    pairs = encode_items(datasets.load_dataset(dataset)[:6], smollm2.tokenizer, PromptFormat.CHAT)
    assert [pair.index for pair in longest_first(pairs)] != list(range(6))
    stack = models.find_layers(smollm2)
    for pair in pairs:
        alone = run_batches_locally(smollm2, stack, [10, 11, 12], [make_batch([pair], smollm2.tokenizer.pad_token_id)],
                                    -2, "slices")[0].slices  # [2, 3, 576]
        for row, layer in enumerate([10, 11, 12]):
            positive = torch.load(directory / f"activations_pos_{layer}_{name}.pt")
            assert torch.allclose(positive[pair.index], alone[0, row], atol=1e-4)

    manifest = json.loads((directory / f"manifest_{name}.json").read_text())
    assert manifest["layers"] == [10, 11, 12]
    assert manifest["n_items"] == 6
    assert manifest["read_index"] == -2
    assert manifest["prompt_format"] == "chat"
    assert manifest["dataset_sha256"] == __import__("hashlib").sha256(dataset.read_bytes()).hexdigest()
    assert set(manifest["vector_norms"]) == {"10", "11", "12"}
    assert manifest["versions"]["nnsight"] == "0.8.1"
    assert not (directory / f".partial_{name}").exists()
    leftovers = [path.name for path in directory.iterdir() if path.name.endswith(".tmp")]
    assert leftovers == []


class _StopAfter:
    """Progress callback that raises KeyboardInterrupt once ``limit`` items are done."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, done: int, total: int, status: str) -> None:
        if done >= self.limit:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_identical_vectors(smollm2, model_dirs, caa_data, tmp_path):
    dataset = caa_data / "myopic-reward" / "generate_dataset.json"
    common = dict(model=str(model_dirs["smollm2"]), dataset=dataset, layers="5,20", limit=12, batch_size=4)
    uninterrupted = generate_vectors(RunConfig(**common, out_dir=tmp_path / "whole"), model=smollm2)

    with pytest.raises(KeyboardInterrupt):
        generate_vectors(RunConfig(**common, out_dir=tmp_path / "cut"), progress=_StopAfter(8), model=smollm2)
    partial = tmp_path / "cut" / "myopic-reward" / ".partial_smollm2-135m-instruct" / "state.pt"
    assert torch.load(partial)["items_done"] == 8

    done = []
    resumed = generate_vectors(RunConfig(**common, out_dir=tmp_path / "cut"),
                               progress=lambda d, t, s: done.append(d), model=smollm2)
    assert done[0] == 8
    assert torch.equal(resumed.vectors, uninterrupted.vectors)


def test_resume_with_other_layers_is_rejected(smollm2, model_dirs, caa_data, tmp_path):
    dataset = caa_data / "myopic-reward" / "generate_dataset.json"
    common = dict(model=str(model_dirs["smollm2"]), dataset=dataset, limit=8, batch_size=4, out_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        generate_vectors(RunConfig(**common, layers="5"), progress=_StopAfter(4), model=smollm2)
    with pytest.raises(storage.ResumeMismatchError, match="layers: saved \\[5\\], now \\[6\\]"):
        generate_vectors(RunConfig(**common, layers="6"), model=smollm2)
    restarted = generate_vectors(RunConfig(**common, layers="6", restart=True), model=smollm2)
    assert restarted.manifest["n_items"] == 8
