"""CAA A/B datasets: loading, validation and the embedded demo dataset.

A dataset is a JSON list (or JSONL file) of objects with three string fields::

    {"question": "...\n (A) ...\n (B) ...",
     "answer_matching_behavior": "(A)",
     "answer_not_matching_behavior": "(B)"}

The answers name one choice letter in parentheses; ``(A)`` to ``(Z)`` are accepted, and
a bare letter ``A`` is normalised to ``(A)``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

QUESTION_KEY = "question"
POSITIVE_KEY = "answer_matching_behavior"
NEGATIVE_KEY = "answer_not_matching_behavior"
REQUIRED_KEYS = (QUESTION_KEY, POSITIVE_KEY, NEGATIVE_KEY)

DEMO_DATASET_NAME = "demo"

_ANSWER = re.compile(r"^\(([A-Za-z])\)$")
_BARE_LETTER = re.compile(r"^[A-Za-z]$")


class DatasetError(ValueError):
    """A dataset file that cannot be read or an item that does not follow the CAA format."""


@dataclass(frozen=True)
class ABItem:
    """One contrastive pair: a question and the answers that do and do not show the behaviour."""

    question: str
    positive: str
    negative: str

    @property
    def positive_letter(self) -> str:
        return self.positive[1]

    @property
    def negative_letter(self) -> str:
        return self.negative[1]


def demo_dataset_path() -> Path:
    """Return the path of the small A/B dataset shipped with the package."""
    return Path(str(resources.files("ndif_vectors") / "data" / "demo_dataset.json"))


def normalize_answer(answer: str, index: int, key: str) -> str:
    """Return ``answer`` stripped, as ``(X)``; raise ``DatasetError`` naming the item otherwise."""
    text = answer.strip()
    if _BARE_LETTER.match(text):
        text = f"({text})"
    if not _ANSWER.match(text):
        raise DatasetError(
            f"Item {index}: {key} is {answer!r}, which is not an answer choice. "
            "Write one letter in parentheses, such as '(A)'."
        )
    return text


def parse_items(records: object, source: str = "dataset") -> list[ABItem]:
    """Validate decoded JSON records and return them as ``ABItem`` objects."""
    if not isinstance(records, list):
        raise DatasetError(
            f"{source} must contain a JSON list of items (or one JSON object per line); "
            f"found {type(records).__name__}."
        )
    if not records:
        raise DatasetError(f"{source} is empty: it needs at least one A/B item.")

    items = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(
                f"Item {index} of {source} is a {type(record).__name__}; each item must be an "
                f"object with the keys {', '.join(REQUIRED_KEYS)}."
            )
        for key in REQUIRED_KEYS:
            if key not in record:
                raise DatasetError(
                    f"Item {index} of {source} is missing the key {key!r}; each item needs "
                    f"{', '.join(REQUIRED_KEYS)}."
                )
            if not isinstance(record[key], str):
                raise DatasetError(
                    f"Item {index} of {source}: {key} must be a string, "
                    f"not {type(record[key]).__name__} ({record[key]!r})."
                )
        question = record[QUESTION_KEY]
        if not question.strip():
            raise DatasetError(f"Item {index} of {source}: the question is empty.")
        positive = normalize_answer(record[POSITIVE_KEY], index, POSITIVE_KEY)
        negative = normalize_answer(record[NEGATIVE_KEY], index, NEGATIVE_KEY)
        if positive == negative:
            raise DatasetError(
                f"Item {index} of {source}: both answers are {positive}; the matching and "
                "non-matching answers must differ."
            )
        items.append(ABItem(question=question, positive=positive, negative=negative))
    return items


def load_dataset(path: str | Path) -> list[ABItem]:
    """Read and validate a CAA dataset file (JSON list or JSONL, UTF-8)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"Dataset file not found: {path}") from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not valid UTF-8 ({error}); save it as UTF-8.") from None

    try:
        if path.suffix == ".jsonl":
            records = [
                json.loads(line)
                for line in text.splitlines()
                if line.strip()
            ]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    return parse_items(records, source=str(path))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def behaviour_name(path: str | Path) -> str:
    """Name a behaviour after its dataset: the folder for ``*_dataset.json`` files, else the stem.

    ``data/caa/sycophancy/generate_dataset.json`` gives ``sycophancy``, as in the CAA layout.
    """
    path = Path(path)
    if path == demo_dataset_path():
        return DEMO_DATASET_NAME
    if path.stem.endswith("dataset") and path.parent.name:
        return path.parent.name
    return path.stem
