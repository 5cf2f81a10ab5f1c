"""Dataset validation: each bad input is rejected with the item index and the fix."""

from __future__ import annotations

import json

import pytest

from ndif_vectors.datasets import DatasetError, behaviour_name, demo_dataset_path, load_dataset

GOOD = {"question": "Q?\n (A) x\n (B) y", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}


def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_demo_dataset_is_valid():
    items = load_dataset(demo_dataset_path())
    assert len(items) >= 20
    assert {item.positive for item in items} == {"(A)", "(B)"}


def test_shared_datasets_load(caa_data):
    for behaviour in ("sycophancy", "refusal", "myopic-reward", "coordinate-other-ais", "corrigible-neutral-HHH"):
        items = load_dataset(caa_data / behaviour / "generate_dataset.json")
        assert items, behaviour
        assert behaviour_name(caa_data / behaviour / "generate_dataset.json") == behaviour


def test_answers_are_stripped_and_normalised(tmp_path):
    records = [
        {**GOOD, "answer_matching_behavior": " (H) ", "answer_not_matching_behavior": "B"},
    ]
    item = load_dataset(_write(tmp_path, records))[0]
    assert item.positive == "(H)"
    assert item.negative == "(B)"


def test_jsonl_is_read(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(GOOD) for _ in range(3)) + "\n", encoding="utf-8")
    assert len(load_dataset(path)) == 3


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({k: v for k, v in GOOD.items() if k != "question"}, "Item 1 .*missing the key 'question'"),
        ({**GOOD, "answer_matching_behavior": 1}, "Item 1 .*answer_matching_behavior must be a string"),
        ({**GOOD, "answer_not_matching_behavior": "(AB)"}, "Item 1: answer_not_matching_behavior is '\\(AB\\)'"),
        ({**GOOD, "answer_matching_behavior": "Yes"}, "Item 1: answer_matching_behavior is 'Yes'"),
        ({**GOOD, "answer_not_matching_behavior": "(A)"}, "Item 1 .*both answers are \\(A\\)"),
        ({**GOOD, "question": "  "}, "Item 1 .*question is empty"),
        (["not", "an", "object"], "Item 1 .*is a list"),
    ],
)
def test_bad_item_names_index(tmp_path, record, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(_write(tmp_path, [GOOD, record]))


def test_empty_dataset_rejected(tmp_path):
    with pytest.raises(DatasetError, match="is empty"):
        load_dataset(_write(tmp_path, []))


def test_top_level_object_rejected(tmp_path):
    with pytest.raises(DatasetError, match="JSON list"):
        load_dataset(_write(tmp_path, GOOD))


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"question": }\n]', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2"):
        load_dataset(path)


def test_non_utf8_rejected(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([GOOD]).replace("Q?", "Caf\u00e9?").encode("latin-1"))
    with pytest.raises(DatasetError, match="not valid UTF-8"):
        load_dataset(path)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.json")
