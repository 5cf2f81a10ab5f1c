"""Export to llama.cpp GGUF, safetensors and .pt, read back with the formats' own readers."""

from __future__ import annotations

import gguf
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from ndif_vectors.analysis import load_run
from ndif_vectors.export import ExportError, export_run, read_gguf
from test_analysis import _app, random_vectors, write_run


@pytest.fixture
def run(tmp_path):
    return load_run(write_run(tmp_path / "vectors", "refusal", random_vectors(0, layers=(0, 1, 7, 12), width=24)))


def test_gguf_round_trip(run, tmp_path):
    path = tmp_path / "refusal.gguf"
    result = export_run(run, path, "gguf", hint="llama")
    assert result.layers == [1, 7, 12]
    assert result.skipped_layers == [0]

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[field.data[0]]).decode() == "controlvector"
    field = reader.get_field("controlvector.model_hint")
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    field = reader.get_field("controlvector.layer_count")
    assert int(field.parts[field.data[0]][0]) == 3
    assert sorted(tensor.name for tensor in reader.tensors) == ["direction.1", "direction.12", "direction.7"]
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        layer = int(tensor.name.split(".")[1])
        assert torch.equal(torch.from_numpy(tensor.data.copy()), run.vectors[layer]), tensor.name

    hint, vectors = read_gguf(path)
    assert hint == "llama"
    assert sorted(vectors) == [1, 7, 12]


def test_gguf_rejects_explicit_layer_zero(run, tmp_path):
    with pytest.raises(ExportError, match="Layer 0 cannot be exported to GGUF"):
        export_run(run, tmp_path / "x.gguf", "gguf", layers=[0, 1])


def test_safetensors_round_trip(run, tmp_path):
    path = tmp_path / "refusal.safetensors"
    result = export_run(run, path, "safetensors", layers=[0, 12])
    assert result.layers == [0, 12]
    with safe_open(str(path), "pt") as stream:
        assert sorted(stream.keys()) == ["layer.0", "layer.12"]
        assert stream.metadata()["behaviour"] == "refusal"
        for layer in (0, 12):
            assert torch.equal(stream.get_tensor(f"layer.{layer}"), run.vectors[layer])


def test_pt_round_trip(run, tmp_path):
    path = tmp_path / "refusal.pt"
    export_run(run, path, "pt")
    loaded = torch.load(path, weights_only=True)
    assert sorted(loaded) == [0, 1, 7, 12]
    for layer, vector in loaded.items():
        assert torch.equal(vector, run.vectors[layer])


def test_export_errors_name_the_value(run, tmp_path):
    with pytest.raises(ExportError, match="Layer 5 has no vector"):
        export_run(run, tmp_path / "x.pt", "pt", layers=[5])
    with pytest.raises(ExportError, match="Invalid format 'onnx'"):
        export_run(run, tmp_path / "x.onnx", "onnx")


def test_cli_export_gguf(run, tmp_path):
    out = tmp_path / "cli.gguf"
    completed = CliRunner().invoke(
        _app(), ["export", "--vectors", str(run.directory), "--format", "gguf", "--out", str(out), "--layers", "7,12"]
    )
    assert completed.exit_code == 0, completed.output
    _, vectors = read_gguf(out)
    assert sorted(vectors) == [7, 12]

    completed = CliRunner().invoke(
        _app(), ["export", "--vectors", str(run.directory), "--format", "gguf", "--out", str(out), "--layers", "0"]
    )
    assert completed.exit_code == 1
    assert "Layer 0 cannot be exported" in completed.output
