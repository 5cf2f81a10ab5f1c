"""Shared fixtures: the real SmolLM2 model, a tiny random GPT-2, and the CAA datasets.

The CAA datasets are read from ``../shared/data/caa`` next to the repository (override
with ``NDIF_VECTORS_CAA_DATA``); a missing directory fails the tests instead of skipping.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from make_test_models import make_test_models  # noqa: E402

from ndif_vectors import models  # noqa: E402


def _caa_root() -> Path:
    override = os.environ.get("NDIF_VECTORS_CAA_DATA")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data" / "caa"


@pytest.fixture(scope="session")
def caa_data() -> Path:
    root = _caa_root()
    if not (root / "sycophancy" / "generate_dataset.json").is_file():
        pytest.fail(f"CAA datasets not found at {root}; set NDIF_VECTORS_CAA_DATA to their directory.")
    return root


@pytest.fixture(scope="session")
def test_models_dir() -> Path:
    """Directory of the test models; the local NDIF stack's own when it is running."""
    for variable in ("NDIF_TEST_MODELS_DIR", "NDIF_VECTORS_TEST_MODELS"):
        if os.environ.get(variable):
            return Path(os.environ[variable])
    return models.cache_dir() / "test-models"


@pytest.fixture(scope="session")
def model_dirs(test_models_dir) -> dict[str, Path]:
    return make_test_models(test_models_dir)


@pytest.fixture(scope="session")
def smollm2(model_dirs):
    """SmolLM2-135M-Instruct as a local nnsight model, float32 on the CPU."""
    return models.load_model(str(model_dirs["smollm2"]))


@pytest.fixture(scope="session")
def tiny_gpt2(model_dirs):
    return models.load_model(str(model_dirs["tiny-gpt2"]))
