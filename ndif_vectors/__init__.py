"""ndif-vectors: Contrastive Activation Addition (CAA) steering vectors, locally or on NDIF.

The command line (``ndif-vectors run``) is a thin layer over this API::

    from ndif_vectors import RunConfig, generate_vectors

    result = generate_vectors(RunConfig(dataset="refusal/generate_dataset.json", layers="10-14"))
    result.vectors  # [n_layers, d_model], float32
"""

from .datasets import ABItem, DatasetError, load_dataset
from .models import DEFAULT_MODEL, ModelError, find_layers, load_model, parse_layers
from .pipeline import RunConfig, RunResult, generate_vectors
from .prompts import PromptError, PromptFormat
from .storage import ResumeMismatchError, load_vectors

__all__ = [
    "ABItem",
    "DEFAULT_MODEL",
    "DatasetError",
    "ModelError",
    "PromptError",
    "PromptFormat",
    "ResumeMismatchError",
    "RunConfig",
    "RunResult",
    "find_layers",
    "generate_vectors",
    "load_dataset",
    "load_model",
    "load_vectors",
    "parse_layers",
]
