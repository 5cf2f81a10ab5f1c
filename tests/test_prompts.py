"""Prompt formats on SmolLM2's real tokenizer, and the read-position check."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ndif_vectors.datasets import ABItem
from ndif_vectors.prompts import (
    PromptError, PromptFormat, encode_items, encode_prompt, render_prompt, resolve_format,
)


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    return AutoTokenizer.from_pretrained(model_dirs["smollm2"])


def test_chat_format_puts_letter_at_minus_two(tokenizer):
    text = render_prompt("Is the sky blue?\n (A) yes\n (B) no", "(B)", PromptFormat.CHAT, tokenizer)
    ids = encode_prompt(text, tokenizer)
    assert tokenizer.decode([ids[-2]]) == "B"
    assert tokenizer.decode([ids[-1]]) == ")"
    assert text.endswith("<|im_start|>assistant\n(B)")
    assert "<|im_end|>" not in text.rsplit("assistant", 1)[1]


def test_chat_format_has_exactly_one_bos(tokenizer):
    ids = encode_prompt(render_prompt("Q?", "(A)", PromptFormat.CHAT, tokenizer), tokenizer)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 3  # <|im_start|> opens the system, user and assistant turns
    assert ids[1] != tokenizer.bos_token_id


def test_bos_is_never_doubled(tokenizer):
    # A template that writes BOS, tokenized by a tokenizer that also adds one.
    class AddsBos:
        bos_token_id = tokenizer.bos_token_id

        def __call__(self, text):
            return {"input_ids": [self.bos_token_id] + tokenizer(text)["input_ids"]}

    ids = encode_prompt(tokenizer.bos_token + "hello", AddsBos())
    assert ids[:2] != [tokenizer.bos_token_id] * 2
    assert ids[0] == tokenizer.bos_token_id


def test_chat_format_system_prompt(tokenizer):
    text = render_prompt("Q?", "(A)", PromptFormat.CHAT, tokenizer, system_prompt="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_llama2_format_is_caa_text():
    assert render_prompt(" Q? ", "(A)", PromptFormat.LLAMA2) == "[INST] Q? [/INST] (A)"
    with_system = render_prompt("Q?", "(A)", PromptFormat.LLAMA2, system_prompt="S")
    assert with_system == "<<SYS>>\nS\n<</SYS>>\n\n[INST] Q? [/INST] (A)"


def test_base_format():
    assert render_prompt("Q?", "(A)", PromptFormat.BASE) == "Input: Q?\nResponse: (A)"


def test_default_format_follows_template(tokenizer):
    assert resolve_format(None, tokenizer) is PromptFormat.CHAT

    class NoTemplate:
        chat_template = None

    assert resolve_format(None, NoTemplate()) is PromptFormat.BASE
    with pytest.raises(PromptError, match="--prompt-format base"):
        resolve_format("chat", NoTemplate())


def test_letters_beyond_b_at_minus_two(tokenizer):
    items = [ABItem("Pick one.\n (G) a\n (H) b", "(H)", "(G)")]
    for prompt_format in PromptFormat:
        pair = encode_items(items, tokenizer, prompt_format)[0]
        assert tokenizer.decode([pair.positive[-2]]).strip() == "H"
        assert tokenizer.decode([pair.negative[-2]]).strip() == "G"


def test_wrong_read_index_names_item_and_tokens(tokenizer):
    items = [ABItem("Q1?", "(A)", "(B)"), ABItem("Q2?", "(B)", "(A)")]
    with pytest.raises(PromptError) as error:
        encode_items(items, tokenizer, PromptFormat.CHAT, read_index=-3, start_index=40)
    message = str(error.value)
    assert "Item 40 (positive prompt)" in message
    assert "'('" in message
    assert "Last five tokens: [" in message
    assert "')'" in message
