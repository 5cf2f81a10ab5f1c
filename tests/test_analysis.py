"""Normalisation and comparison on run folders in the layout of ``ndif-vectors run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from ndif_vectors import storage
from ndif_vectors.analysis import RunError, compare_runs, load_run, load_runs, normalize_runs, write_normalized
from ndif_vectors.cli_analysis import register

MODEL_NAME = "smollm2-135m-instruct"


def write_run(out_dir: Path, behaviour: str, vectors: dict[int, torch.Tensor], model_name: str = MODEL_NAME) -> Path:
    """Write vectors and a manifest the way the pipeline does; return the behaviour folder."""
    paths = storage.OutputPaths(out_dir, behaviour, model_name)
    layers = sorted(vectors)
    storage.write_vectors(paths, layers, torch.stack([vectors[layer] for layer in layers]))
    storage.save_json(paths.manifest, {
        "behaviour": behaviour,
        "model": model_name,
        "model_name": model_name,
        "layers": layers,
        "d_model": int(vectors[layers[0]].shape[0]),
        "vector_norms": {str(layer): float(vectors[layer].norm()) for layer in layers},
    })
    return paths.directory


def random_vectors(seed: int, layers=(3, 4, 5), width: int = 16, scale: float = 1.0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(width, generator=generator) * scale * (layer + 1) for layer in layers}


@pytest.fixture
def three_behaviours(tmp_path) -> Path:
    root = tmp_path / "vectors"
    write_run(root, "refusal", random_vectors(0, scale=1.0))
    write_run(root, "sycophancy", random_vectors(1, scale=3.0))
    write_run(root, "myopic-reward", random_vectors(2, scale=0.5))
    return root


def test_normalize_equalizes_norms(three_behaviours, tmp_path):
    runs = load_runs([three_behaviours])
    result = normalize_runs(runs)
    assert result.layers == [3, 4, 5]
    for layer in result.layers:
        before = torch.tensor([run.vectors[layer].double().norm() for run in runs])
        after = torch.tensor([run.vectors[layer].double().norm() for run in result.runs])
        assert torch.allclose(after, before.mean().expand(3), rtol=1e-6), f"layer {layer}: {after.tolist()}"
        for original, normalized in zip(runs, result.runs):
            cos = torch.nn.functional.cosine_similarity(original.vectors[layer].double(),
                                                        normalized.vectors[layer].double(), dim=0)
            assert cos > 1 - 1e-6, f"{original.behaviour} layer {layer}: cosine {cos}"


def test_normalize_writes_run_layout(three_behaviours, tmp_path):
    result = normalize_runs(load_runs([three_behaviours]))
    out = tmp_path / "normalized"
    write_normalized(result, out)

    reloaded = load_runs([out])
    assert sorted(run.behaviour for run in reloaded) == ["myopic-reward", "refusal", "sycophancy"]
    for run in reloaded:
        manifest = run.manifest
        assert manifest["normalization"]["behaviours"] == ["myopic-reward", "refusal", "sycophancy"]
        assert set(manifest["normalization"]["target_norms"]) == {"3", "4", "5"}
        for layer in (3, 4, 5):
            pt = torch.load(out / run.behaviour / f"vec_layer_{layer}_{MODEL_NAME}.pt")
            assert torch.equal(pt, run.vectors[layer])
            assert manifest["vector_norms"][str(layer)] == pytest.approx(
                manifest["normalization"]["target_norms"][str(layer)], rel=1e-6)


def test_normalize_keeps_only_shared_layers(tmp_path):
    root = tmp_path / "vectors"
    write_run(root, "a", random_vectors(0, layers=(3, 4, 5)))
    write_run(root, "b", random_vectors(1, layers=(4, 5, 6)))
    result = normalize_runs(load_runs([root]))
    assert result.layers == [4, 5]
    assert result.dropped_layers == {"a": [3], "b": [6]}


def test_normalize_rejects_bad_inputs(tmp_path):
    root = tmp_path / "vectors"
    single = write_run(root, "refusal", random_vectors(0))
    with pytest.raises(RunError, match="at least two behaviours, got 1"):
        normalize_runs(load_runs([single]))

    other = write_run(tmp_path / "wide", "sycophancy", random_vectors(1, width=32))
    with pytest.raises(RunError, match="d_model 32"):
        normalize_runs(load_runs([single, other]))

    with pytest.raises(RunError, match="'refusal' is given more than once"):
        normalize_runs(load_runs([single, single]))

    disjoint = write_run(tmp_path / "disjoint", "myopic-reward", random_vectors(2, layers=(9,)))
    with pytest.raises(RunError, match="share no layer"):
        normalize_runs(load_runs([single, disjoint]))


def test_load_run_errors_name_the_path(tmp_path):
    with pytest.raises(RunError, match="not found"):
        load_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="contains no manifest"):
        load_runs([tmp_path / "empty"])
    directory = write_run(tmp_path, "refusal", random_vectors(0), model_name="model-a")
    write_run(tmp_path, "refusal", random_vectors(1), model_name="model-b")
    with pytest.raises(RunError, match="runs of 2 models"):
        load_run(directory)
    assert load_run(directory, "model-b").model_name == "model-b"


def test_compare_identical_runs_is_one(tmp_path):
    first = write_run(tmp_path / "local", "refusal", random_vectors(0))
    second = write_run(tmp_path / "ndif", "refusal", random_vectors(0))
    comparison = compare_runs(load_runs([first, second]))
    assert comparison.mode == "runs"
    assert comparison.per_layer == pytest.approx({3: 1.0, 4: 1.0, 5: 1.0}, abs=1e-12)
    assert torch.allclose(comparison.matrix.diagonal(), torch.ones(3, dtype=torch.float64))


def test_compare_layers_of_one_run(tmp_path):
    vectors = random_vectors(0)
    directory = write_run(tmp_path, "refusal", vectors)
    comparison = compare_runs(load_runs([directory]))
    assert comparison.mode == "layers"
    assert comparison.row_labels == ["3", "4", "5"]
    assert torch.allclose(comparison.matrix.diagonal(), torch.ones(3, dtype=torch.float64))
    expected = torch.nn.functional.cosine_similarity(vectors[3].double(), vectors[5].double(), dim=0)
    assert float(comparison.matrix[0, 2]) == pytest.approx(float(expected), abs=1e-12)


def test_compare_behaviours_per_layer(three_behaviours):
    runs = load_runs([three_behaviours])
    comparison = compare_runs(runs)
    assert comparison.mode == "behaviours"
    assert comparison.row_labels == ["myopic-reward vs refusal", "myopic-reward vs sycophancy",
                                     "refusal vs sycophancy"]
    assert comparison.column_labels == ["3", "4", "5"]
    expected = torch.nn.functional.cosine_similarity(runs[1].vectors[4].double(), runs[2].vectors[4].double(), dim=0)
    assert float(comparison.matrix[2, 1]) == pytest.approx(float(expected), abs=1e-12)


def test_compare_rejects_mixed_widths(tmp_path):
    first = write_run(tmp_path / "a", "refusal", random_vectors(0))
    second = write_run(tmp_path / "b", "refusal", random_vectors(0, width=32))
    with pytest.raises(RunError, match="different widths"):
        compare_runs(load_runs([first, second]))


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def main() -> None:
        """Test entry point."""

    register(app)
    return app


def test_cli_normalize_and_compare(three_behaviours, tmp_path):
    runner = CliRunner()
    out = tmp_path / "normalized"
    completed = runner.invoke(_app(), ["normalize", str(three_behaviours), "--out", str(out)])
    assert completed.exit_code == 0, completed.output
    assert (out / "refusal" / f"manifest_{MODEL_NAME}.json").is_file()

    png = tmp_path / "similarity.png"
    completed = runner.invoke(_app(), ["compare", str(out), "--out", str(png)])
    assert completed.exit_code == 0, completed.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(png.with_suffix(".json").read_text())
    assert data["mode"] == "behaviours"
    assert len(data["matrix"]) == 3


def test_cli_errors_exit_one_without_traceback(tmp_path):
    completed = CliRunner().invoke(_app(), ["normalize", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert completed.exit_code == 1
    assert "not found" in completed.output
    assert "Traceback" not in completed.output
