"""The shipped sentiment dataset is well formed, balanced and has a clean held-out split."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from supportsim.sentiment.model import LABELS, ROLES, load_examples, normalise_label, read_examples


def _key(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def splits():
    return {"train": load_examples("train"), "test": load_examples("test")}


def test_splits_are_big_enough(splits):
    assert len(splits["train"]) >= 400
    assert len(splits["test"]) >= 120


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_label_and_role_is_present_and_balanced(splits, split):
    examples = splits[split]
    labels = Counter(example.label for example in examples)
    roles = Counter(example.role for example in examples)
    assert set(labels) == set(LABELS)
    assert set(roles) == set(ROLES)
    for label in LABELS:
        assert labels[label] / len(examples) >= 0.2, labels
    for role in ROLES:
        assert roles[role] / len(examples) >= 0.3, roles
        for label in LABELS:
            assert any(e.role == role and e.label == label for e in examples), (role, label)


@pytest.mark.parametrize("split", ["train", "test"])
def test_no_duplicate_texts_within_a_split(splits, split):
    counts = Counter(_key(example.text) for example in splits[split])
    assert [text for text, count in counts.items() if count > 1] == []


def test_no_text_is_in_both_splits(splits):
    train = {_key(example.text) for example in splits["train"]}
    assert [e.text for e in splits["test"] if _key(e.text) in train] == []


def test_tricky_cases_are_covered(splits):
    """Negation, sarcasm and identifiers in neutral lines appear in the data, labelled as meant."""
    examples = {e.text: e.label for e in splits["train"] + splits["test"]}
    assert examples["I'm not happy at all with how this has been handled."] == "negative"
    assert examples["Great, another broken charger. Just what I needed."] == "negative"
    assert examples["I appreciate your help, but this is the third time it has failed."] == (
        "negative"
    )
    assert examples["Not bad at all, the replacement works fine."] == "positive"
    assert any(e.label == "neutral" and any(c.isdigit() for c in e.text) for e in splits["test"])


def test_bad_rows_are_rejected_with_file_and_line(tmp_path):
    rows = [
        {"text": "fine", "label": "positive", "role": "customer"},
        {"text": "hmm", "label": "happy", "role": "customer"},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: label"):
        read_examples(path)
    path.write_text('{"text": "ok", "label": "neutral", "role": "bot"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: role"):
        read_examples(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not JSON"):
        read_examples(path)


@pytest.mark.parametrize(
    ("raw", "index", "num_labels", "expected"),
    [
        ("negative", 0, 3, "negative"),
        ("Neutral", 1, 3, "neutral"),
        ("POSITIVE", 1, 2, "positive"),
        ("LABEL_0", 0, 3, "negative"),
        ("LABEL_1", 1, 3, "neutral"),
        ("LABEL_2", 2, 3, "positive"),
        ("LABEL_1", 1, 2, "positive"),
        ("pos", 2, 3, "positive"),
        ("1 star", 0, 5, "negative"),
        ("3 stars", 2, 5, "neutral"),
        ("5 stars", 4, 5, "positive"),
    ],
)
def test_model_labels_map_onto_three_classes(raw, index, num_labels, expected):
    assert normalise_label(raw, index, num_labels) == expected


def test_unknown_model_labels_are_refused():
    with pytest.raises(ValueError, match="cannot map model label 'joy'"):
        normalise_label("joy", 0, 6)
    with pytest.raises(ValueError):
        normalise_label("LABEL_3", 3, 4)
