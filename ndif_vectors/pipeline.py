"""The CAA run from dataset to vector files: the function that ``ndif-vectors run`` calls.

Each step has its own module. ``datasets`` reads and validates the A/B items, ``models``
loads the model and picks layers, and ``prompts`` writes and tokenizes the prompts and
checks the read position. ``extraction`` (with ``remote`` for NDIF) traces the batches,
``aggregation`` averages and ``storage`` writes the files. Partial results are saved
after every request, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from . import datasets, models, prompts, storage
from .aggregation import MeanDifference
from .extraction import BatchResult, longest_first, make_batch, run_batches_locally

logger = logging.getLogger(__name__)

REDUCE_MODES = ("client", "server")


@dataclass
class RunConfig:
    """Settings of one steering-vector run; the CLI options map one to one onto these fields."""

    model: str = models.DEFAULT_MODEL
    dataset: Path | None = None
    """CAA-format JSON or JSONL file; ``None`` selects the embedded demo dataset."""
    layers: str = "all"
    out_dir: Path = Path("vectors")
    behaviour: str | None = None
    """Output subdirectory; defaults to the dataset's folder name or file stem."""
    prompt_format: str | None = None
    """``chat``, ``llama2`` or ``base``; ``None`` picks ``chat`` if the tokenizer has a template."""
    system_prompt: str | None = None
    read_index: int = -2
    batch_size: int = 8
    limit: int | None = None
    """Use only the first ``limit`` items of the dataset."""
    device: str = "cpu"
    dtype: str = "float32"
    revision: str | None = None
    save_activations: bool = False
    restart: bool = False
    remote: bool = False
    reduce: str = "client"
    """``client``: the ``[2b, n_layers, d_model]`` slices come back; ``server``: only sums."""
    batches_per_request: int = 1
    host: str | None = None
    api_key: str | None = field(default=None, repr=False)
    wait: bool = True
    """``False`` submits every request and returns; see ``submit_vectors``."""

    def to_json(self) -> dict:
        """Return the settings as JSON values, without the API key."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "api_key"}
        data["dataset"] = str(Path(self.dataset).resolve()) if self.dataset else None
        data["out_dir"] = str(Path(self.out_dir).resolve())
        data["restart"] = False
        data["wait"] = True
        return data

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        config = cls(**data)
        config.dataset = Path(config.dataset) if config.dataset else None
        config.out_dir = Path(config.out_dir)
        return config

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"Invalid batch size {self.batch_size}: it must be at least 1.")
        if self.batches_per_request < 1:
            raise ValueError(
                f"Invalid batches per request {self.batches_per_request}: it must be at least 1."
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"Invalid limit {self.limit}: it must be at least 1.")
        if not self.wait and not self.remote:
            raise ValueError("--no-wait submits jobs to NDIF, so it needs --remote.")
        if self.reduce not in REDUCE_MODES:
            raise ValueError(f"Invalid reduce mode {self.reduce!r}; choose one of {', '.join(REDUCE_MODES)}.")
        if self.reduce == "server" and self.save_activations:
            raise ValueError(
                "--reduce server returns only sums, so it cannot save activations. "
                "Drop --save-activations or use --reduce client."
            )
        if self.read_index >= 0:
            raise ValueError(
                f"Invalid read index {self.read_index}: it counts from the end of the prompt, "
                "so it must be negative (-2 is the answer letter of '(A)')."
            )


@dataclass
class RunResult:
    """Vectors, file paths and manifest of a finished run."""

    layers: list[int]
    vectors: torch.Tensor  # [n_layers, d_model], float32
    paths: storage.OutputPaths
    manifest: dict
    files: list[Path]


ProgressCallback = Callable[[int, int, str], None]
"""Called as ``progress(items_done, items_total, status)``; status is e.g. ``running``."""


def hidden_size(model) -> int:
    config = model._module.config
    config = getattr(config, "text_config", None) or config
    for attribute in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    raise models.ModelError(f"Could not read the hidden size from the config of {type(model._module).__name__}.")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("ndif-vectors", "nnsight", "torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class LocalExecutor:
    """Runs batches on a model loaded in this process."""

    description = "local"

    def __init__(self, model, stack: models.LayerStack, layers: list[int], read_index: int, reduction: str):
        self.model, self.stack, self.layers = model, stack, layers
        self.read_index, self.reduction = read_index, reduction
        self.requests = 0
        self.bytes_downloaded = 0
        self.result_bytes = 0

    def run(self, batches, on_status: Callable[[str], None] | None = None) -> list[BatchResult]:
        self.requests += 1
        return run_batches_locally(self.model, self.stack, self.layers, batches, self.read_index, self.reduction)


def _fingerprint(config: RunConfig, model_id: str, dataset_sha: str, n_items: int, layers: list[int],
                 prompt_format: prompts.PromptFormat) -> dict:
    # Batch size and batches per request are left out on purpose: they change how the
    # work is cut, not the result, so a run may resume with other values.
    return {
        "model": model_id,
        "revision": config.revision,
        "dtype": config.dtype,
        "dataset_sha256": dataset_sha,
        "n_items": n_items,
        "layers": layers,
        "prompt_format": prompt_format.value,
        "system_prompt": config.system_prompt,
        "read_index": config.read_index,
        "reduce": config.reduce,
        "save_activations": config.save_activations,
    }


@dataclass
class _PreparedRun:
    """Everything a run needs before its first request, shared by waiting and submitting runs."""

    config: RunConfig
    dataset_path: Path
    dataset_sha: str
    behaviour: str
    executor: object
    model_id: str
    stack: models.LayerStack
    layers: list[int]
    d_model: int
    prompt_format: prompts.PromptFormat
    pairs: list[prompts.EncodedPair]
    """Pairs in processing order (longest first), each with its dataset index."""
    pad_token_id: int
    paths: storage.OutputPaths
    state: storage.RunState

    def requests_from(self, items_done: int):
        """Yield ``(first item, batches)`` for every request from item ``items_done`` on."""
        config = self.config
        request_items = config.batch_size * config.batches_per_request
        for start in range(items_done, len(self.pairs), request_items):
            chunk = self.pairs[start: start + request_items]
            yield start, [
                make_batch(chunk[offset: offset + config.batch_size], self.pad_token_id)
                for offset in range(0, len(chunk), config.batch_size)
            ]


def _prepare(config: RunConfig, model) -> _PreparedRun:
    config.validate()

    # 1. Dataset
    dataset_path = Path(config.dataset) if config.dataset else datasets.demo_dataset_path()
    items = datasets.load_dataset(dataset_path)
    if config.limit is not None:
        items = items[: config.limit]
    dataset_sha = datasets.file_sha256(dataset_path)
    behaviour = config.behaviour or datasets.behaviour_name(dataset_path)
    logger.info("Dataset %s: %d items, behaviour %r", dataset_path, len(items), behaviour)

    # 2. Model, layers and the executor that runs the traces
    executor, model, model_id = _prepare_executor(config, model)
    stack = models.find_layers(model)
    layers = models.parse_layers(config.layers, stack.count)
    executor.layers = layers
    executor.reduction = "sum" if config.reduce == "server" else "slices"
    d_model = hidden_size(model)
    tokenizer = model.tokenizer
    logger.info("Model %s: %d layers at %s, d_model %d; reading layers %s", model_id, stack.count,
                stack.path, d_model, layers)

    # 3. Prompts, all checked before the first forward pass
    prompt_format = prompts.resolve_format(config.prompt_format, tokenizer)
    pairs = longest_first(
        prompts.encode_items(items, tokenizer, prompt_format, config.system_prompt, config.read_index)
    )
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    # 4. Output paths and the resume state
    paths = storage.OutputPaths(Path(config.out_dir), behaviour, models.model_name(model_id))
    state = storage.RunState(
        paths.partial, _fingerprint(config, model_id, dataset_sha, len(items), layers, prompt_format)
    )
    if config.restart:
        state.clear()
    return _PreparedRun(config, dataset_path, dataset_sha, behaviour, executor, model_id, stack, layers,
                        d_model, prompt_format, pairs, pad_token_id, paths, state)


def generate_vectors(
    config: RunConfig,
    progress: ProgressCallback | None = None,
    model=None,
) -> RunResult:
    """Build CAA steering vectors with the settings in ``config`` and write them under ``config.out_dir``.

    ``model`` may be a preloaded nnsight model (local runs) so that several runs share it.
    Jobs that an earlier ``submit_vectors`` left on NDIF are collected instead of sent again.
    Raises ``DatasetError``, ``PromptError``, ``ModelError`` or ``ValueError`` with the bad
    value and the fix; the remote path adds ``remote.RemoteRunError``.
    """
    started = time.monotonic()
    run = _prepare(config, model)
    executor, state, pairs = run.executor, run.state, run.pairs

    aggregate = MeanDifference(run.layers, run.d_model)
    items_done, stats = 0, {"requests": 0, "bytes_downloaded": 0, "result_bytes": 0, "seconds": 0.0}
    saved = state.load()
    if saved is not None:
        aggregate.load_state_dict(saved)
        items_done, stats = int(saved["items_done"]), dict(saved["stats"])
        if items_done:
            logger.info("Resuming from %s: %d of %d items already done", state.directory, items_done, len(pairs))
    jobs = storage.JobStore(state.directory)

    # 5. Extraction: each request contains batches_per_request batches
    if progress:
        progress(items_done, len(pairs), "running")
    for start, batches in run.requests_from(items_done):
        request_started = time.monotonic()
        n_items = sum(batch.size for batch in batches)

        def on_status(status: str, done=items_done) -> None:
            if progress:
                progress(done, len(pairs), status)

        requests_before, bytes_before = executor.requests, executor.bytes_downloaded
        result_bytes_before = executor.result_bytes
        job_id = jobs.job_for(start, n_items) if config.remote else None
        results = None
        if job_id is not None:
            try:
                results = executor.collect(job_id, batches, on_status=on_status)
            except RuntimeError as error:
                # The request is deterministic, so sending it again is safe. A failure
                # inside the trace fails the same way again and is raised from run().
                # NOTE: seen with ndif 0.1.2 on CPU: a job queued right behind another
                # failed with greenlet's "parent cannot be on a different thread".
                logger.warning("Job %s failed on the server (%s); sending its request again.",
                               job_id, str(error).splitlines()[-1])
        if results is None:
            results = executor.run(batches, on_status=on_status)
        position = start
        for result in results:
            aggregate.add(result)
            size = len(result.item_indices)
            if config.save_activations:
                state.save_activation_chunk(
                    position, result.item_indices, result.slices[:size].float(), result.slices[size:].float(),
                )
            position += size
        items_done += n_items
        stats["requests"] += executor.requests - requests_before
        stats["bytes_downloaded"] += executor.bytes_downloaded - bytes_before
        stats["result_bytes"] += executor.result_bytes - result_bytes_before
        stats["seconds"] += time.monotonic() - request_started
        state.save(aggregate.state_dict(), items_done, stats)
        if progress:
            progress(items_done, len(pairs), "running")

    # 6. Vectors and files
    vectors = aggregate.mean()  # [n_layers, d_model]
    paths, layers = run.paths, run.layers
    files = storage.write_vectors(paths, layers, vectors)
    if config.save_activations:
        positive, negative = state.load_activations()
        files += storage.write_activations(paths, layers, positive, negative)

    manifest = {
        "behaviour": run.behaviour,
        "model": run.model_id,
        "model_name": paths.model_name,
        "revision": config.revision,
        "dtype": config.dtype,
        "device": "ndif" if config.remote else config.device,
        "execution": executor.description,
        "layers": layers,
        "n_model_layers": run.stack.count,
        "layer_path": run.stack.path,
        "d_model": run.d_model,
        "prompt_format": run.prompt_format.value,
        "system_prompt": config.system_prompt,
        "read_index": config.read_index,
        "dataset": str(run.dataset_path),
        "dataset_sha256": run.dataset_sha,
        "n_items": len(pairs),
        "batch_size": config.batch_size,
        "batches_per_request": config.batches_per_request,
        "reduce": config.reduce,
        "requests": stats["requests"],
        "bytes_downloaded": stats["bytes_downloaded"],
        "result_bytes": stats["result_bytes"],
        "seconds": round(stats["seconds"], 3),
        "wall_seconds": round(time.monotonic() - started, 3),
        "vector_norms": {str(layer): float(vectors[row].norm()) for row, layer in enumerate(layers)},
        "versions": package_versions(),
        "files": {
            "vectors": [paths.vector(layer).name for layer in layers],
            "safetensors": paths.safetensors.name,
        },
    }
    files.append(storage.save_json(paths.manifest, manifest))
    state.clear()
    logger.info("Wrote %d layer vectors to %s", len(layers), paths.directory)
    return RunResult(layers, vectors, paths, manifest, files)


@dataclass
class Submission:
    """Jobs that ``submit_vectors`` left on NDIF, and where to collect them from."""

    directory: Path
    job_ids: list[str]
    n_items: int


def submit_vectors(config: RunConfig, progress: ProgressCallback | None = None, model=None) -> Submission:
    """Submit every request of a remote run without waiting, for long NDIF queues.

    The job ids and the settings are saved in the run's partial directory;
    ``collect_vectors`` on that output directory later downloads the results in order
    and writes the same files as a waiting run. Requests already submitted are skipped.
    """
    if not config.remote:
        raise ValueError("Only remote runs can be submitted without waiting: add --remote.")
    run = _prepare(config, model)
    state, jobs = run.state, storage.JobStore(run.state.directory)
    saved = state.load()
    items_done = int(saved["items_done"]) if saved else 0
    if saved is None:
        # Records the settings fingerprint, so a later run with other settings is rejected.
        state.save(MeanDifference(run.layers, run.d_model).state_dict(), 0,
                   {"requests": 0, "bytes_downloaded": 0, "result_bytes": 0, "seconds": 0.0})
    storage.save_json(state.directory / "run.json", config.to_json())

    job_ids = []
    for start, batches in run.requests_from(items_done):
        n_items = sum(batch.size for batch in batches)
        job_id = jobs.job_for(start, n_items)
        if job_id is None:
            job_id = run.executor.submit(batches)
            jobs.add(start, n_items, job_id)
        job_ids.append(job_id)
        if progress:
            progress(start + n_items, len(run.pairs), "submitted")
    logger.info("Submitted %d jobs for %s; collect them with: ndif-vectors collect %s",
                len(job_ids), run.behaviour, run.paths.directory)
    return Submission(run.paths.directory, job_ids, len(run.pairs))


def pending_runs(directory: Path) -> list[RunConfig]:
    """Return the settings of every submitted run under ``directory`` (a behaviour or output folder)."""
    directory = Path(directory)
    files = sorted(directory.glob(".partial_*/run.json")) + sorted(directory.glob("*/.partial_*/run.json"))
    if not files:
        raise ValueError(
            f"No submitted run found in {directory}: expected .partial_<model>/run.json there or one "
            "folder below. Submit one with: ndif-vectors run --remote --no-wait ..."
        )
    return [RunConfig.from_json(json.loads(path.read_text(encoding="utf-8"))) for path in files]


def collect_vectors(directory: Path, progress: ProgressCallback | None = None) -> list[RunResult]:
    """Wait for the jobs of every submitted run under ``directory`` and write its vectors."""
    return [generate_vectors(config, progress=progress) for config in pending_runs(directory)]


def _prepare_executor(config: RunConfig, model):
    """Return ``(executor, nnsight model, model id)`` for a local or a remote run."""
    if config.remote:
        from . import remote

        return remote.prepare_remote(config, model)
    if model is None:
        model = models.load_model(config.model, device=config.device, dtype=config.dtype,
                                  revision=config.revision)
    executor = LocalExecutor(model, models.find_layers(model), [], config.read_index, "slices")
    return executor, model, models.model_id(config.model)
