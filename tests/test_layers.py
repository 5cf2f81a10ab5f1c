"""Layer selection and decoder-block discovery across architectures."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

from ndif_vectors.models import ModelError, find_layers, parse_layers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(range(6))),
        ("1-3", [1, 2, 3]),
        ("-1", [5]),
        ("-2--1", [4, 5]),
        ("3,1,1,-1", [1, 3, 5]),
        (" 0 , 2 ", [0, 2]),
        ("0-1,4", [0, 1, 4]),
    ],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 6) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("6", "Invalid layer 6 .*has 6 layers"),
        ("-7", "Invalid layer -7"),
        ("4-2", "start is after the end"),
        ("ten", "Invalid layer selection 'ten'"),
        ("", "names no layer"),
        ("1,,x", "Invalid layer selection 'x'"),
    ],
)
def test_parse_layers_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layers(spec, 6)


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("config", "path"),
    [
        (LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2), "model.layers"),
        (Qwen2Config(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2), "model.layers"),
        (GPT2Config(n_layer=5, n_embd=16, n_head=2), "transformer.h"),
        (GPTNeoXConfig(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=2), "gpt_neox.layers"),
    ],
)
def test_find_layers(config, path):
    stack = find_layers(_meta_model(config))
    assert stack.path == path
    assert stack.count == _meta_model(config).config.num_hidden_layers


def test_find_layers_on_real_model(smollm2):
    stack = find_layers(smollm2)
    assert (stack.path, stack.count) == ("model.layers", 30)


def test_find_layers_rejects_model_without_blocks():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    module.config = LlamaConfig(num_hidden_layers=3)
    with pytest.raises(ModelError, match="Could not find the decoder layers of Sequential"):
        find_layers(module)
