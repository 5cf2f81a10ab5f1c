"""Prompt formats, tokenization and the read-position check.

Every prompt ends with the answer, e.g. ``(A)``, so that with the default read index -2
the activation is read at the answer letter (index -1 is the closing parenthesis).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from .datasets import ABItem

logger = logging.getLogger(__name__)


class PromptFormat(str, enum.Enum):
    """How a question and an answer are written into one prompt."""

    CHAT = "chat"
    """The tokenizer's chat template; the answer starts the assistant turn."""
    LLAMA2 = "llama2"
    """``[INST] {question} [/INST] {answer}``, the text of the CAA paper's Llama 2 chat runs."""
    BASE = "base"
    """``Input: {question}\\nResponse: {answer}`` for models without a chat template."""


class PromptError(ValueError):
    """A prompt whose tokens do not put the answer letter at the read position."""


def resolve_format(requested: PromptFormat | str | None, tokenizer) -> PromptFormat:
    """Return ``requested``, or ``chat`` when the tokenizer has a chat template and ``base`` otherwise."""
    if requested is not None:
        prompt_format = PromptFormat(requested)
        if prompt_format is PromptFormat.CHAT and not getattr(tokenizer, "chat_template", None):
            raise PromptError(
                "The chat prompt format needs a tokenizer with a chat template, and this one "
                "has none. Use --prompt-format base or --prompt-format llama2."
            )
        return prompt_format
    prompt_format = PromptFormat.CHAT if getattr(tokenizer, "chat_template", None) else PromptFormat.BASE
    logger.info("Prompt format: %s (the default for this tokenizer)", prompt_format.value)
    return prompt_format


def render_prompt(
    question: str,
    answer: str,
    prompt_format: PromptFormat,
    tokenizer=None,
    system_prompt: str | None = None,
) -> str:
    """Write ``question`` and ``answer`` as the text of one prompt that ends with ``answer``."""
    if prompt_format is PromptFormat.CHAT:
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": question})
        # The answer is appended after the generation prompt instead of passed as an
        # assistant message: a finished assistant message would end with the template's
        # end-of-turn token, which would move the answer letter away from index -2.
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return head + answer
    if prompt_format is PromptFormat.LLAMA2:
        # Whitespace and the system block placement follow the CAA repository's
        # tokenize_llama_chat: the <<SYS>> block precedes [INST] and the question is stripped.
        system = f"<<SYS>>\n{system_prompt}\n<</SYS>>\n\n" if system_prompt else ""
        return f"{system}[INST] {question.strip()} [/INST] {answer.strip()}"
    system = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{system}Input: {question}\nResponse: {answer}"


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Tokenize ``text`` with the tokenizer's own special-token defaults, never doubling BOS.

    A chat template that already writes the BOS token would otherwise get a second one
    from tokenizers that add BOS by default.
    """
    ids = tokenizer(text)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return list(ids)


@dataclass(frozen=True)
class EncodedPair:
    """The token ids of one item's positive and negative prompt."""

    index: int
    positive: list[int]
    negative: list[int]


def encode_items(
    items: list[ABItem],
    tokenizer,
    prompt_format: PromptFormat,
    system_prompt: str | None = None,
    read_index: int = -2,
    start_index: int = 0,
) -> list[EncodedPair]:
    """Render and tokenize each item's two prompts and check the read position of both.

    ``start_index`` is the dataset index of ``items[0]``, so that errors name the item's
    position in the file.
    """
    pairs = []
    for offset, item in enumerate(items):
        index = start_index + offset
        encoded = {}
        for side, answer in (("positive", item.positive), ("negative", item.negative)):
            text = render_prompt(item.question, answer, prompt_format, tokenizer, system_prompt)
            ids = encode_prompt(text, tokenizer)
            check_read_position(ids, answer[1], read_index, tokenizer, index, side)
            encoded[side] = ids
        pairs.append(EncodedPair(index, encoded["positive"], encoded["negative"]))
    return pairs


def check_read_position(
    ids: list[int], letter: str, read_index: int, tokenizer, item_index: int, side: str
) -> None:
    """Raise ``PromptError`` unless the token at ``read_index`` decodes to ``letter``."""
    if not -len(ids) <= read_index < len(ids):
        raise PromptError(
            f"Item {item_index} ({side} prompt): read index {read_index} is outside the "
            f"prompt's {len(ids)} tokens."
        )
    token = tokenizer.decode([ids[read_index]])
    if token.strip() == letter:
        return
    tail = [tokenizer.decode([token_id]) for token_id in ids[-5:]]
    raise PromptError(
        f"Item {item_index} ({side} prompt): the token at read index {read_index} is "
        f"{token!r}, not the answer letter {letter!r}. Last five tokens: {tail}. "
        "The tokenizer may merge the letter with a parenthesis, or the answer may end in "
        "whitespace; fix the answer text, or choose another --read-index or --prompt-format."
    )
