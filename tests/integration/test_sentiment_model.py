"""The real builtin sentiment model: trained (or taken from the cache) once per session.

The cache is ``$SUPPORTSIM_CACHE`` when set, else ``~/.cache/supportsim``; the first run trains the
model there (about a minute on two cores), later runs load it.
"""

from __future__ import annotations

import io
import json
import re

import pytest

from supportsim.sentiment.model import (
    BUILTIN_NAME,
    Scorer,
    builtin_model_dir,
    evaluate,
    format_evaluation,
    load_examples,
    score_lines,
)

# measured 0.94 on the held-out split; the floor leaves room for a few flips across CPUs
ACCURACY_FLOOR = 0.90

# written for these tests, not in the dataset
CLEAR = {
    "negative": [
        "This is the worst service I've ever had, I'm furious and I want my money back.",
        "My new laptop arrived with a shattered screen and I'm really angry about it.",
        "The hotel was dirty, the staff were rude and our holiday was ruined.",
        "I've been waiting three weeks for my refund and nobody answers. This is unacceptable.",
    ],
    "positive": [
        "Thank you so much, you've been wonderful!",
        "Great news, your refund has been approved and the money is on its way.",
        "I'm really happy, the headphones work perfectly now. Thanks for your help!",
        "We had an amazing trip, thank you for organising everything.",
    ],
    "neutral": [
        "My order number is 5531298.",
        "What time does check-in open at the hotel?",
        "Could you send me the tracking number, please?",
        "The flight leaves at 10:25 from terminal 3.",
    ],
}


@pytest.fixture(scope="session")
def scorer() -> Scorer:
    return Scorer("builtin", threads=2, progress=print)


def test_held_out_accuracy_is_above_the_floor(scorer):
    result = evaluate(scorer, load_examples("test"))
    print()
    print(format_evaluation(result))
    assert result.count >= 120
    assert result.accuracy >= ACCURACY_FLOOR


def test_builtin_model_is_cached_and_named_after_its_training(scorer):
    assert (builtin_model_dir() / "config.json").is_file()
    assert re.fullmatch(re.escape(BUILTIN_NAME) + r"@[0-9a-f]{8}", scorer.name)


def test_dataset_never_contains_the_clear_cases():
    known = {e.text for e in load_examples("train") + load_examples("test")}
    assert [t for texts in CLEAR.values() for t in texts if t in known] == []


@pytest.mark.parametrize("label", ["negative", "neutral", "positive"])
def test_clear_messages_get_the_right_label_and_score(scorer, label):
    for text, sentiment in zip(CLEAR[label], scorer.score_batch(CLEAR[label]), strict=True):
        assert sentiment.label == label, (text, sentiment)
        assert -1.0 <= sentiment.score <= 1.0
        assert sentiment.model == scorer.name
        if label == "positive":
            assert sentiment.score > 0.5, (text, sentiment)
        elif label == "negative":
            assert sentiment.score < -0.5, (text, sentiment)
        else:
            assert abs(sentiment.score) < 0.5, (text, sentiment)


def test_batch_scoring_equals_single_scoring(scorer):
    texts = [text for texts in CLEAR.values() for text in texts] + [
        e.text for e in load_examples("test")[:20]
    ]
    batched = scorer.score_batch(texts, batch_size=32)
    single = [scorer.score(text) for text in texts]
    for one, many in zip(single, batched, strict=True):
        assert one.label == many.label
        assert one.score == pytest.approx(many.score, abs=1e-4)


def test_long_and_empty_texts_are_scored(scorer):
    long = "The charger is broken again and I am upset. " * 200
    results = scorer.score_batch([long, ""])
    assert results[0].label == "negative"
    assert -1.0 <= results[1].score <= 1.0


def test_a_model_folder_loads_like_the_builtin(scorer):
    from_folder = Scorer(str(builtin_model_dir()))
    assert from_folder.name == scorer.name
    texts = CLEAR["positive"] + CLEAR["negative"]
    expected = scorer.score_batch(texts)
    for got, want in zip(from_folder.score_batch(texts), expected, strict=True):
        assert got.label == want.label
        assert got.score == pytest.approx(want.score, abs=1e-4)


def test_a_missing_model_folder_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no model folder"):
        Scorer("./no-such-model-folder")


def test_score_lines_round_trip(scorer):
    source = io.StringIO(
        "Thank you so much, you've been wonderful!\n"
        "\n"
        '{"text": "My order number is 5531298.", "conversation": 7}\n'
        '{"message": "no text field here"}\n'
        "{not json\n"
        "   \n"
        "The hotel was dirty, the staff were rude and our holiday was ruined.\n"
    )
    output = io.StringIO()
    counts = score_lines(source, output, scorer, batch_size=2)
    rows = [json.loads(line) for line in output.getvalue().splitlines()]
    assert (counts.scored, counts.errors) == (3, 2)
    assert len(rows) == 5
    assert rows[0]["text"] == "Thank you so much, you've been wonderful!"
    assert rows[0]["label"] == "positive" and rows[0]["score"] > 0.5
    assert rows[1] == {
        "text": "My order number is 5531298.",
        "label": "neutral",
        "score": rows[1]["score"],
    }
    assert rows[2]["line"] == 4 and '"text"' in rows[2]["error"]
    assert rows[3]["line"] == 5 and rows[3]["error"].startswith("invalid JSON")
    assert rows[4]["label"] == "negative" and rows[4]["score"] < -0.5
    assert set(rows[4]) == {"text", "label", "score"}
