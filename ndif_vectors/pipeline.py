"""The CAA run from dataset to vector files: the function that ``ndif-vectors run`` calls.

Each step has its own module. ``datasets`` reads and validates the A/B items, ``models``
loads the model and picks layers, and ``prompts`` writes and tokenizes the prompts and
checks the read position. ``extraction`` (with ``remote`` for NDIF) traces the batches,
``aggregation`` averages and ``storage`` writes the files. Partial results are saved
after every request, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

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
from .extraction import BatchResult, make_batch, run_batches_locally

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

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"Invalid batch size {self.batch_size}: it must be at least 1.")
        if self.batches_per_request < 1:
            raise ValueError(
                f"Invalid batches per request {self.batches_per_request}: it must be at least 1."
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"Invalid limit {self.limit}: it must be at least 1.")
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


def generate_vectors(
    config: RunConfig,
    progress: ProgressCallback | None = None,
    model=None,
) -> RunResult:
    """Build CAA steering vectors with the settings in ``config`` and write them under ``config.out_dir``.

    ``model`` may be a preloaded nnsight model (local runs) so that several runs share it.
    Raises ``DatasetError``, ``PromptError``, ``ModelError`` or ``ValueError`` with the bad
    value and the fix; the remote path adds ``remote.RemoteRunError``.
    """
    config.validate()
    started = time.monotonic()

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
    d_model = hidden_size(model)
    tokenizer = model.tokenizer
    logger.info("Model %s: %d layers at %s, d_model %d; reading layers %s", model_id, stack.count,
                stack.path, d_model, layers)

    # 3. Prompts, all checked before the first forward pass
    prompt_format = prompts.resolve_format(config.prompt_format, tokenizer)
    pairs = prompts.encode_items(items, tokenizer, prompt_format, config.system_prompt, config.read_index)
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    # 4. Resume state
    paths = storage.OutputPaths(Path(config.out_dir), behaviour, models.model_name(model_id))
    state = storage.RunState(
        paths.partial, _fingerprint(config, model_id, dataset_sha, len(items), layers, prompt_format)
    )
    if config.restart:
        state.clear()
    aggregate = MeanDifference(layers, d_model)
    items_done, stats = 0, {"requests": 0, "bytes_downloaded": 0, "seconds": 0.0}
    saved = state.load()
    if saved is not None:
        aggregate.load_state_dict(saved)
        items_done, stats = int(saved["items_done"]), dict(saved["stats"])
        logger.info("Resuming from %s: %d of %d items already done", state.directory, items_done, len(pairs))

    # 5. Extraction: each request contains batches_per_request batches
    reduction = "sum" if config.reduce == "server" else "slices"
    executor.reduction = reduction
    request_items = config.batch_size * config.batches_per_request
    if progress:
        progress(items_done, len(pairs), "running")
    while items_done < len(pairs):
        segment_started = time.monotonic()
        chunk = pairs[items_done: items_done + request_items]
        batches = [
            make_batch(chunk[start: start + config.batch_size], pad_token_id)
            for start in range(0, len(chunk), config.batch_size)
        ]

        def on_status(status: str, done=items_done) -> None:
            if progress:
                progress(done, len(pairs), status)

        requests_before, bytes_before = executor.requests, executor.bytes_downloaded
        results = executor.run(batches, on_status=on_status)
        for result in results:
            aggregate.add(result)
            if config.save_activations:
                n_items = len(result.item_indices)
                state.save_activation_chunk(
                    result.item_indices[0],
                    result.slices[:n_items].float(), result.slices[n_items:].float(),
                )
        items_done += len(chunk)
        stats["requests"] += executor.requests - requests_before
        stats["bytes_downloaded"] += executor.bytes_downloaded - bytes_before
        stats["seconds"] += time.monotonic() - segment_started
        state.save(aggregate.state_dict(), items_done, stats)
        if progress:
            progress(items_done, len(pairs), "running")

    # 6. Vectors and files
    vectors = aggregate.mean()  # [n_layers, d_model]
    files = storage.write_vectors(paths, layers, vectors)
    if config.save_activations:
        positive, negative = state.load_activation_chunks()
        files += storage.write_activations(paths, layers, torch.cat(positive), torch.cat(negative))

    manifest = {
        "behaviour": behaviour,
        "model": model_id,
        "model_name": paths.model_name,
        "revision": config.revision,
        "dtype": config.dtype,
        "device": "ndif" if config.remote else config.device,
        "execution": executor.description,
        "layers": layers,
        "n_model_layers": stack.count,
        "layer_path": stack.path,
        "d_model": d_model,
        "prompt_format": prompt_format.value,
        "system_prompt": config.system_prompt,
        "read_index": config.read_index,
        "dataset": str(dataset_path),
        "dataset_sha256": dataset_sha,
        "n_items": len(items),
        "batch_size": config.batch_size,
        "batches_per_request": config.batches_per_request,
        "reduce": config.reduce,
        "requests": stats["requests"],
        "bytes_downloaded": stats["bytes_downloaded"],
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
