"""Export a run's vectors as a llama.cpp control vector (GGUF), a safetensors file or a ``.pt`` dict.

GGUF layout, as llama.cpp reads control vectors and as repeng's ``export_gguf`` writes them:

* ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (a string
  that llama.cpp does not check) and ``controlvector.layer_count`` (the number of
  direction tensors, as repeng writes it);
* one 1-D float32 tensor ``direction.<n>`` per layer.

Layer mapping, checked in llama.cpp's source (``common/common.cpp``
``common_control_vector_load_one``, ``src/llama-adapter.cpp`` ``llama_adapter_cvec``, and
the model graphs, which call ``build_cvec(cur, il)`` right after block ``il``'s final
residual add): ``direction.<n>`` is added to the output of block ``n``, counted from 0
like ``model.layers[n]`` in transformers. So a vector read from decoder layer ``L`` here
is written as ``direction.L``. llama.cpp keeps no tensor for block 0 and rejects a file
that contains ``direction.0`` ("invalid (zero) direction tensor layer index"), so a
layer-0 vector cannot be exported to GGUF.

llama.cpp adds the vector at every position, the prompt included, scaled by the
strength given with ``--control-vector-scaled``. This package's ``eval`` adds it only
from the answer on by default, so one multiplier can have different effects in the two.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import models, storage
from .analysis import RunVectors

logger = logging.getLogger(__name__)

FORMATS = ("gguf", "safetensors", "pt")
GGUF_ARCHITECTURE = "controlvector"


class ExportError(ValueError):
    """Vectors or settings that cannot be written in the requested format."""


@dataclass
class ExportResult:
    """What an export wrote."""

    path: Path
    format: str
    layers: list[int]
    skipped_layers: list[int]
    """Layers left out because the format cannot hold them (layer 0 in GGUF)."""


def model_hint(run: RunVectors) -> str:
    """Return the model's ``model_type`` from its local config.json (what repeng writes), else the model name."""
    model = run.manifest.get("model")
    candidates = []
    if model == "SmolLM2-135M-Instruct":
        # The manifest names the default model by this short name, not by its alias.
        candidates.append(models.cache_dir() / "models" / "SmolLM2-135M-Instruct" / "config.json")
    if isinstance(model, str):
        candidates.append(Path(model) / "config.json")
    for config_path in candidates:
        try:
            model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(model_type, str) and model_type:
            return model_type
    return run.model_name


def select_layers(run: RunVectors, layers: list[int] | None, fmt: str) -> tuple[list[int], list[int]]:
    """Return ``(layers to write, layers skipped)``; raise ``ExportError`` for a missing or unwritable layer."""
    if layers is None:
        chosen = run.layers
    else:
        missing = [layer for layer in layers if layer not in run.vectors]
        if missing:
            raise ExportError(
                f"Layer {missing[0]} has no vector in {run.directory}; it has layers {run.layers}."
            )
        chosen = sorted(set(layers))
    skipped = []
    if fmt == "gguf" and 0 in chosen:
        if layers is not None:
            raise ExportError(
                "Layer 0 cannot be exported to GGUF: llama.cpp applies direction.<n> to the output "
                "of block n, keeps no vector for block 0 and rejects a file with direction.0. "
                "Leave layer 0 out of --layers."
            )
        chosen = [layer for layer in chosen if layer != 0]
        skipped = [0]
        logger.warning("Layer 0 is left out of the GGUF file: llama.cpp has no control vector slot for block 0.")
    if not chosen:
        raise ExportError(f"No layer of {run.directory} can be written as {fmt} (layers {run.layers}).")
    return chosen, skipped


def write_gguf(vectors: dict[int, torch.Tensor], path: Path, hint: str) -> Path:
    """Write ``vectors`` (layer -> ``[d_model]``) as a llama.cpp control-vector GGUF file."""
    import gguf

    if 0 in vectors:
        raise ExportError("Layer 0 cannot be written to GGUF: llama.cpp rejects direction.0.")

    def write(temporary: Path) -> None:
        writer = gguf.GGUFWriter(str(temporary), GGUF_ARCHITECTURE)
        writer.add_string(f"{GGUF_ARCHITECTURE}.model_hint", hint)
        writer.add_uint32(f"{GGUF_ARCHITECTURE}.layer_count", len(vectors))
        for layer in sorted(vectors):
            writer.add_tensor(f"direction.{layer}", vectors[layer].detach().float().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return storage.atomic_write(path, write)


def read_gguf(path: Path) -> tuple[str, dict[int, torch.Tensor]]:
    """Read a control-vector GGUF file back as ``(model_hint, {layer: vector})``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    architecture = _string_field(reader, "general.architecture")
    if architecture != GGUF_ARCHITECTURE:
        raise ExportError(f"{path} has general.architecture {architecture!r}, not {GGUF_ARCHITECTURE!r}.")
    hint = _string_field(reader, f"{GGUF_ARCHITECTURE}.model_hint")
    vectors = {}
    for tensor in reader.tensors:
        prefix, _, layer = tensor.name.partition(".")
        if prefix != "direction" or not layer.isdigit():
            raise ExportError(f"{path} has a tensor named {tensor.name!r}; expected direction.<layer>.")
        vectors[int(layer)] = torch.from_numpy(tensor.data.copy()).float()
    return hint, dict(sorted(vectors.items()))


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def export_run(run: RunVectors, path: Path, fmt: str, layers: list[int] | None = None,
               hint: str | None = None) -> ExportResult:
    """Write the vectors of ``run`` to ``path`` in format ``fmt`` (``gguf``, ``safetensors`` or ``pt``).

    ``safetensors`` uses the keys ``layer.<L>`` of the run's own bundle and stores the
    behaviour and model as metadata; ``pt`` is a ``torch.save``'d ``{layer: vector}`` dict.
    """
    if fmt not in FORMATS:
        raise ExportError(f"Invalid format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    chosen, skipped = select_layers(run, layers, fmt)
    vectors = {layer: run.vectors[layer].float().contiguous().clone() for layer in chosen}
    path = Path(path)
    if fmt == "gguf":
        write_gguf(vectors, path, hint or model_hint(run))
    elif fmt == "safetensors":
        tensors = {f"layer.{layer}": vector for layer, vector in vectors.items()}
        metadata = {"behaviour": run.behaviour, "model": str(run.manifest.get("model", run.model_name)),
                    "layers": ",".join(str(layer) for layer in chosen)}
        storage.atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    else:
        storage.save_tensor(path, vectors)
    return ExportResult(path, fmt, chosen, skipped)
