"""Output files: CAA's per-layer vectors, a safetensors bundle, a JSON manifest, and resume state.

Layout, for behaviour ``B`` and model name ``M`` under the output directory ``DIR``::

    DIR/B/vec_layer_<L>_M.pt            one 1-D float32 tensor per layer (CAA's naming)
    DIR/B/vectors_M.safetensors         every layer, keys "layer.<L>"
    DIR/B/manifest_M.json               settings, provenance and per-layer norms
    DIR/B/activations_pos_<L>_M.pt      [N, d_model] with --save-activations (CAA's naming)
    DIR/B/activations_neg_<L>_M.pt
    DIR/B/.partial_M/                   resume state while a run is unfinished

Every file is written to a temporary name in the same directory and renamed into place,
so an interrupted write never leaves a complete-looking file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

STATE_VERSION = 2


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def save_tensor(path: Path, tensor) -> Path:
    return atomic_write(path, lambda temporary: torch.save(tensor, temporary))


def save_json(path: Path, data: dict) -> Path:
    def write(temporary: Path) -> None:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")

    return atomic_write(path, write)


@dataclass(frozen=True)
class OutputPaths:
    """File names of one run's outputs."""

    out_dir: Path
    behaviour: str
    model_name: str

    @property
    def directory(self) -> Path:
        return Path(self.out_dir) / self.behaviour

    def vector(self, layer: int) -> Path:
        return self.directory / f"vec_layer_{layer}_{self.model_name}.pt"

    def activations(self, side: str, layer: int) -> Path:
        return self.directory / f"activations_{side}_{layer}_{self.model_name}.pt"

    @property
    def safetensors(self) -> Path:
        return self.directory / f"vectors_{self.model_name}.safetensors"

    @property
    def manifest(self) -> Path:
        return self.directory / f"manifest_{self.model_name}.json"

    @property
    def partial(self) -> Path:
        return self.directory / f".partial_{self.model_name}"


def write_vectors(paths: OutputPaths, layers: list[int], vectors: torch.Tensor) -> list[Path]:
    """Write one ``.pt`` file per layer and the safetensors bundle; ``vectors`` is ``[n_layers, d_model]``."""
    written = []
    for row, layer in enumerate(layers):
        written.append(save_tensor(paths.vector(layer), vectors[row].clone()))
    tensors = {f"layer.{layer}": vectors[row].contiguous().clone() for row, layer in enumerate(layers)}
    written.append(atomic_write(paths.safetensors, lambda temporary: save_file(tensors, str(temporary))))
    return written


def write_activations(paths: OutputPaths, layers: list[int], positive: torch.Tensor,
                      negative: torch.Tensor) -> list[Path]:
    """Write CAA's per-layer activation files; ``positive`` and ``negative`` are ``[N, n_layers, d_model]``."""
    written = []
    for row, layer in enumerate(layers):
        written.append(save_tensor(paths.activations("pos", layer), positive[:, row].clone()))
        written.append(save_tensor(paths.activations("neg", layer), negative[:, row].clone()))
    return written


def load_vectors(path: Path) -> dict[int, torch.Tensor]:
    """Read a ``vectors_*.safetensors`` bundle into ``{layer: vector}``."""
    tensors = load_file(str(path))
    return {int(key.split(".", 1)[1]): value for key, value in sorted(tensors.items(), key=lambda kv: int(kv[0].split(".", 1)[1]))}


class ResumeMismatchError(ValueError):
    """Saved partial results that belong to a run with other settings."""


class RunState:
    """Partial results of an unfinished run, saved after every batch.

    ``state.pt`` holds the settings fingerprint, the float64 running sum, the count and
    the number of dataset items done; activation chunks sit beside it when requested.
    Items are processed longest first (``extraction.longest_first``), an order fixed by the
    settings in the fingerprint, so "items done" is a prefix of that order.
    """

    def __init__(self, directory: Path, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    @property
    def state_file(self) -> Path:
        return self.directory / "state.pt"

    def load(self) -> dict | None:
        """Return the saved state, or ``None``; raise ``ResumeMismatchError`` if the settings differ."""
        if not self.state_file.is_file():
            return None
        state = torch.load(self.state_file, weights_only=True)
        saved = state.get("fingerprint", {})
        differences = [
            f"{key}: saved {saved.get(key)!r}, now {value!r}"
            for key, value in self.fingerprint.items()
            if saved.get(key) != value
        ]
        if differences or state.get("version") != STATE_VERSION:
            raise ResumeMismatchError(
                f"{self.directory} contains partial results of a run with other settings "
                f"({'; '.join(differences) or 'older state format'}). Rerun with the same "
                "settings to resume, or pass --restart to discard the partial results."
            )
        return state

    def save(self, aggregate_state: dict, items_done: int, stats: dict) -> None:
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "items_done": items_done,
            "stats": stats,
            **aggregate_state,
        }
        save_tensor(self.state_file, state)

    def activation_chunk(self, position: int) -> Path:
        return self.directory / f"activations_{position:09d}.pt"

    def save_activation_chunk(self, position: int, item_indices: list[int], positive: torch.Tensor,
                              negative: torch.Tensor) -> None:
        """Save the ``[b, n_layers, d_model]`` activations of dataset items ``item_indices``.

        ``position`` is where the chunk starts in the processing order.
        """
        chunk = {"item_indices": torch.tensor(item_indices, dtype=torch.long),
                 "positive": positive, "negative": negative}
        save_tensor(self.activation_chunk(position), chunk)

    def load_activations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the saved positive and negative activations, ``[N, n_layers, d_model]``, in dataset order."""
        chunks = [torch.load(path, weights_only=True) for path in sorted(self.directory.glob("activations_*.pt"))]
        order = torch.cat([chunk["item_indices"] for chunk in chunks]).argsort()
        positive = torch.cat([chunk["positive"] for chunk in chunks])[order]
        negative = torch.cat([chunk["negative"] for chunk in chunks])[order]
        return positive, negative

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class JobStore:
    """NDIF job ids of submitted requests, keyed by first item, in ``jobs.json`` of a partial directory."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "jobs.json"

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        return json.loads(self.path.read_text(encoding="utf-8"))

    def job_for(self, start: int, n_items: int) -> str | None:
        """Return the job id of the request for items ``start`` to ``start + n_items - 1``, if submitted."""
        job = self._read().get(str(start))
        if job is None or job["n_items"] != n_items:
            return None
        return job["job_id"]

    def add(self, start: int, n_items: int, job_id: str) -> None:
        jobs = self._read()
        jobs[str(start)] = {"job_id": job_id, "n_items": n_items}
        save_json(self.path, jobs)
