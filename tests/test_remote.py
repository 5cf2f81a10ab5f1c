"""The remote path against a real NDIF server on loopback (the local stack in local_ndif/).

``make test`` starts the stack, runs these tests inside its network namespace and stops
it. Run by hand, they need ``NDIF_HOST`` and ``NDIF_TEST_MODELS_DIR`` from the stack's
``stack.env``; without them they fail instead of being skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ndif_vectors import models
from ndif_vectors.extraction import make_batch
from ndif_vectors.pipeline import RunConfig, generate_vectors
from ndif_vectors.prompts import PromptFormat, encode_items
from ndif_vectors.datasets import load_dataset
from ndif_vectors.remote import RemoteExecutor, RemoteRunError, RemoteSettings, load_remote_model

pytestmark = pytest.mark.remote

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "ndif-test-key-7f3a9c21e5b04d68"


@pytest.fixture(scope="module")
def ndif_host() -> str:
    host = os.environ.get("NDIF_HOST")
    if not host or not os.environ.get("NDIF_TEST_MODELS_DIR"):
        pytest.fail(
            "The remote tests need the local NDIF stack: run `make test`, or start it with "
            "local_ndif/up.sh and source .ndif-stack/stack.env inside `ip netns exec ndifvec`."
        )
    return host


def _run_both(model_dir: Path, dataset: Path, tmp_path: Path, **options):
    common = dict(model=str(model_dir), dataset=dataset, **options)
    local = generate_vectors(RunConfig(**common, out_dir=tmp_path / "local"))
    remote = generate_vectors(RunConfig(**common, out_dir=tmp_path / "remote", remote=True))
    return local, remote


@pytest.mark.parametrize("model_name", ["smollm2", "tiny-gpt2"])
@pytest.mark.parametrize(
    "options",
    [
        {"reduce": "client", "batches_per_request": 1},
        {"reduce": "server", "batches_per_request": 1},
        {"reduce": "client", "batches_per_request": 3},
        {"reduce": "server", "batches_per_request": 3},
    ],
    ids=["slices", "server-sum", "slices-3-per-request", "server-sum-3-per-request"],
)
def test_remote_equals_local(ndif_host, model_dirs, caa_data, tmp_path, model_name, options):
    dataset = caa_data / "sycophancy" / "generate_dataset.json"
    local, remote = _run_both(model_dirs[model_name], dataset, tmp_path, layers="0,2,-1", limit=14,
                              batch_size=2, **options)
    difference = (local.vectors - remote.vectors).abs().max()
    assert difference <= 1e-5, f"max abs difference {difference:.3e}"
    assert remote.manifest["execution"] == "ndif"
    assert remote.manifest["requests"] == -(-7 // options["batches_per_request"])

    # The same files as a local run, under the same names.
    local_files = sorted(path.name for path in local.paths.directory.iterdir())
    remote_files = sorted(path.name for path in remote.paths.directory.iterdir())
    assert local_files == remote_files


def _bytes_per_request(model_dir, caa_data, tmp_path, batch_size, reduce, layers="0-3"):
    result = generate_vectors(RunConfig(
        model=str(model_dir), dataset=caa_data / "refusal" / "generate_dataset.json", layers=layers,
        limit=batch_size * 2, batch_size=batch_size, remote=True, reduce=reduce,
        out_dir=tmp_path / f"{reduce}-{batch_size}",
    ))
    manifest = result.manifest
    # Results travel zstd-compressed, so the wire size is at most the decompressed size.
    assert 0 < manifest["bytes_downloaded"] <= manifest["result_bytes"] + 64
    return manifest["result_bytes"] / manifest["requests"]


def test_bytes_match_slice_size(ndif_host, model_dirs, caa_data, tmp_path):
    d_model, n_layers, value_bytes = 576, 4, 4
    per_item = 2 * n_layers * d_model * value_bytes
    small = _bytes_per_request(model_dirs["smollm2"], caa_data, tmp_path, 2, "client")
    large = _bytes_per_request(model_dirs["smollm2"], caa_data, tmp_path, 8, "client")
    # The difference of two batch sizes cancels the fixed per-request overhead exactly.
    assert (large - small) / 6 == pytest.approx(per_item, rel=0.01)
    overhead = large - 8 * per_item
    assert 0 <= overhead < 4096, f"per-request overhead {overhead} bytes"


def test_server_reduce_bytes_independent_of_batch_size(ndif_host, model_dirs, caa_data, tmp_path):
    small = _bytes_per_request(model_dirs["smollm2"], caa_data, tmp_path, 2, "server")
    large = _bytes_per_request(model_dirs["smollm2"], caa_data, tmp_path, 8, "server")
    summed = 4 * 576 * 4
    assert summed <= small < summed + 4096
    # Only the [b] finite flags grow with the batch: one byte per item.
    assert large - small <= 16


def test_unreachable_host_is_reported(model_dirs, tmp_path):
    config = RunConfig(model=str(model_dirs["tiny-gpt2"]), remote=True, host="http://127.0.0.1:9",
                       layers="0", limit=2, out_dir=tmp_path)
    with pytest.raises(RemoteRunError, match="Could not reach the NDIF host http://127.0.0.1:9"):
        generate_vectors(config)


def test_model_not_deployed_is_reported(ndif_host, model_dirs, tmp_path):
    copy = tmp_path / "not-deployed-gpt2"
    shutil.copytree(model_dirs["tiny-gpt2"], copy)
    config = RunConfig(model=str(copy), remote=True, layers="0", limit=2, out_dir=tmp_path / "out")
    with pytest.raises(RemoteRunError, match="is not served by .*Models served there: .*tiny-gpt2"):
        generate_vectors(config)


def test_exception_inside_trace_shows_remote_traceback(ndif_host, model_dirs):
    model, _ = load_remote_model(str(model_dirs["tiny-gpt2"]))
    items = load_dataset(REPO_ROOT / "ndif_vectors" / "data" / "demo_dataset.json")[:2]
    pairs = encode_items(items, model.tokenizer, PromptFormat.CHAT)
    batch = make_batch(pairs, model.tokenizer.pad_token_id)
    executor = RemoteExecutor(model, models.find_layers(model), [0], read_index=-100000,
                              reduction="slices", settings=RemoteSettings.resolve())
    started = time.monotonic()
    with pytest.raises(RemoteRunError) as error:
        executor.run([batch])
    message = str(error.value)
    assert "will not succeed on retry" in message
    assert "IndexError" in message or "index" in message.lower()
    assert time.monotonic() - started < 30, "a permanent error must not be retried"


def _cli(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "ndif_vectors.cli", *args],
        env={**os.environ, "COLUMNS": "250", **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def test_api_key_never_leaks(ndif_host, model_dirs, caa_data, tmp_path):
    env = {"NDIF_API_KEY": FAKE_KEY}
    ok = _cli("run", "--remote", "--verbose", "--model", str(model_dirs["tiny-gpt2"]), "--dataset",
              str(caa_data / "refusal" / "generate_dataset.json"), "--limit", "4", "--layers", "all",
              "--out", str(tmp_path / "out"), env=env)
    assert ok.returncode == 0, ok.stderr
    missing = tmp_path / "missing-model"
    shutil.copytree(model_dirs["tiny-gpt2"], missing)
    failed = _cli("run", "--remote", "--verbose", "--model", str(missing), "--limit", "2",
                  "--out", str(tmp_path / "out"), env=env)
    assert failed.returncode == 1
    assert "is not served" in failed.stderr
    for completed in (ok, failed):
        assert FAKE_KEY not in completed.stdout
        assert FAKE_KEY not in completed.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def _api_pid() -> int:
    home = Path(os.environ.get("NDIF_STACK_HOME", REPO_ROOT / ".ndif-stack"))
    return int((home / "run" / "api.pid").read_text())


def test_api_restart_mid_run_resumes_to_same_vector(ndif_host, model_dirs, caa_data, tmp_path):
    dataset = caa_data / "sycophancy" / "generate_dataset.json"
    args = ["run", "--remote", "--model", str(model_dirs["smollm2"]), "--dataset", str(dataset),
            "--layers", "0-9", "--limit", "40", "--batch-size", "2"]
    whole = _cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "cut"
    state = out / "sycophancy" / ".partial_smollm2-135m-instruct" / "state.pt"
    process = subprocess.Popen([sys.executable, "-m", "ndif_vectors.cli", *args, "--out", str(out)],
                               env={**os.environ, "COLUMNS": "250"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert state.exists(), "the run saved no partial results"

    subprocess.run(["bash", str(REPO_ROOT / "local_ndif" / "api.sh"), "stop"], check=True, timeout=120)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    assert "rerun the same command to resume" in stderr
    assert "retrying" in stderr
    done = torch.load(state)["items_done"]
    assert 0 < done < 40

    subprocess.run(["bash", str(REPO_ROOT / "local_ndif" / "api.sh"), "start"], check=True, timeout=300)
    resumed = _cli(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} of 40 items already done" in resumed.stderr
    for layer in range(10):
        name = f"vec_layer_{layer}_smollm2-135m-instruct.pt"
        assert torch.equal(torch.load(out / "sycophancy" / name), torch.load(tmp_path / "whole" / "sycophancy" / name))


def test_submit_then_collect_equals_waiting_run(ndif_host, model_dirs, caa_data, tmp_path):
    common = ["--remote", "--model", str(model_dirs["tiny-gpt2"]), "--dataset",
              str(caa_data / "coordinate-other-ais" / "generate_dataset.json"), "--layers", "all",
              "--limit", "10", "--batch-size", "2", "--batches-per-request", "2"]
    waited = _cli("run", *common, "--out", str(tmp_path / "waited"))
    assert waited.returncode == 0, waited.stderr

    submitted = _cli("run", *common, "--no-wait", "--out", str(tmp_path / "later"))
    assert submitted.returncode == 0, submitted.stderr
    assert "Submitted 3 jobs for 10 items" in submitted.stderr
    behaviour_dir = tmp_path / "later" / "coordinate-other-ais"
    jobs = json.loads((behaviour_dir / ".partial_tiny-gpt2" / "jobs.json").read_text())
    assert sorted(jobs, key=int) == ["0", "4", "8"]
    assert not list(behaviour_dir.glob("vec_layer_*"))

    collected = _cli("collect", str(tmp_path / "later"))
    assert collected.returncode == 0, collected.stderr
    for layer in range(4):
        name = f"vec_layer_{layer}_tiny-gpt2.pt"
        assert torch.equal(torch.load(behaviour_dir / name),
                           torch.load(tmp_path / "waited" / "coordinate-other-ais" / name))
    manifest = json.loads((behaviour_dir / "manifest_tiny-gpt2.json").read_text())
    assert manifest["requests"] == 3
    assert not (behaviour_dir / ".partial_tiny-gpt2").exists()


def test_collect_without_submission_is_reported(tmp_path):
    completed = _cli("collect", str(tmp_path))
    assert completed.returncode == 1
    assert "No submitted run found" in completed.stderr


def test_remote_eval_equals_local(ndif_host, smollm2, model_dirs, caa_data):
    from ndif_vectors.remote import connect
    from ndif_vectors.steering import evaluate_steering

    items = load_dataset(caa_data / "refusal" / "test_dataset_ab.json")[:4]
    generator = torch.Generator().manual_seed(0)
    vectors = {10: torch.randn(576, generator=generator) * 2}
    settings = dict(items=items, layers=[10], multipliers=[-2.0, 0.0, 2.0], batch_size=2)

    local = evaluate_steering(smollm2, vectors, **settings)
    meta_model, trace_options = connect(str(model_dirs["smollm2"]))
    remote = evaluate_steering(meta_model, vectors, **settings, trace_options=trace_options)

    difference = (local.probabilities - remote.probabilities).abs().max()
    assert difference <= 1e-5, f"max abs difference {difference:.3e}"
    # Only the [b, 2] letter probabilities come back: 2 batches x 3 multipliers.
    backend = trace_options["backend"]
    assert backend.bytes_downloaded < 6 * 2048, f"{backend.bytes_downloaded} bytes downloaded"


def test_large_request_is_accepted(ndif_host, model_dirs, caa_data, tmp_path):
    """128 long prompts pairs in one request: about 1.5 MB of token ids before compression."""
    local, remote = _run_both(model_dirs["tiny-gpt2"], caa_data / "sycophancy" / "generate_dataset.json",
                              tmp_path, layers="all", limit=128, batch_size=16, batches_per_request=8)
    assert remote.manifest["requests"] == 1
    assert (local.vectors - remote.vectors).abs().max() <= 1e-5
