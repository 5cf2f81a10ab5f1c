"""The ``ndif-vectors`` command in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def _run(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "ndif_vectors.cli", *args],
        cwd=cwd, env={**os.environ, "COLUMNS": "250", **(env or {})}, capture_output=True, text=True, timeout=900,
    )


def test_default_run_on_embedded_model_and_data(tmp_path, model_dirs):
    completed = _run("run", "--layers", "10-12", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    directory = tmp_path / "vectors" / "demo"
    for layer in (10, 11, 12):
        vector = torch.load(directory / f"vec_layer_{layer}_SmolLM2-135M-Instruct.pt")
        assert vector.shape == (576,)
    manifest = json.loads((directory / "manifest_SmolLM2-135M-Instruct.json").read_text())
    assert manifest["n_items"] == 24
    assert "Manifest:" in completed.stderr


def test_run_on_shared_dataset(tmp_path, caa_data, model_dirs):
    completed = _run(
        "run", "--model", str(model_dirs["smollm2"]), "--dataset", str(caa_data / "refusal" / "generate_dataset.json"),
        "--layers", "0,-1", "--limit", "8", "--batch-size", "4", "--out", str(tmp_path / "out"), cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    files = sorted(path.name for path in (tmp_path / "out" / "refusal").iterdir())
    assert "vec_layer_0_smollm2-135m-instruct.pt" in files
    assert "vec_layer_29_smollm2-135m-instruct.pt" in files


def test_bad_dataset_exits_nonzero_with_message(tmp_path):
    dataset = tmp_path / "bad.json"
    dataset.write_text(json.dumps([{"question": "Q", "answer_matching_behavior": "(A)"}]))
    completed = _run("run", "--dataset", str(dataset), cwd=tmp_path)
    assert completed.returncode == 1
    assert "Item 0" in completed.stderr
    assert "answer_not_matching_behavior" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_bad_layers_exits_nonzero_with_message(tmp_path):
    completed = _run("run", "--layers", "40", cwd=tmp_path)
    assert completed.returncode == 1
    assert "Invalid layer 40" in completed.stderr
    assert "30 layers" in completed.stderr


def test_help_describes_options(tmp_path):
    completed = _run("run", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert completed.returncode == 0
    for option in ("--layers", "--batch-size", "--read-index", "--prompt-format", "--remote", "--reduce"):
        assert option in completed.stdout
