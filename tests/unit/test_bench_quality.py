"""bench/quality.py scores a saved run: the figures it prints follow from the transcripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from supportsim.local.processes import REPO_ROOT

CARD = {
    "scenario": "electronics",
    "id": "electronics-test",
    "product": "laptop",
    "facts": {
        "order number": "NW-482913",
        "delivered": "23 days ago",
        "what is wrong": "the screen flickers and goes black after about ten minutes",
        "already tried": "a factory reset",
    },
    "wants": "a full refund",
    "refuses": "store credit",
    "patience": 6,
    "accepts": ["refund"],
}


def line(conversation: str, turn: int, role: str, text: str, mood="angry", **extra) -> dict:
    return {
        "conversation_id": conversation,
        "message_id": f"{conversation}-{turn}",
        "turn": turn,
        "role": role,
        "text": text,
        "customer": {"name": "Dana Reyes", "mood": mood, "product": "laptop"},
        "agent": {"name": "Sam"},
        "model": "template" if turn == 0 else "test-model",
        "final": False,
        "end_reason": None,
        "card": CARD,
        **extra,
    }


def score(tmp_path: Path, messages: list[dict]) -> tuple[dict, str]:
    saved = tmp_path / "chat.jsonl"
    saved.write_text("".join(json.dumps(m) + "\n" for m in messages), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "quality.py"), "--from", str(saved)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = done.stdout.strip().splitlines()[-1]
    return dict(field.split("=", 1) for field in result.split()[2:]), done.stdout


def test_a_saved_run_is_scored_from_its_transcripts_and_cards(tmp_path: Path):
    hello = "Hi Dana, Sam here. How can I help?"
    messages = [
        # resolved: the customer gives its order number, the agent offers a refund
        line("a", 0, "agent", hello),
        line("a", 1, "customer", "My laptop screen flickers. Order NW-482913."),
        line("a", 2, "agent", "I can refund it today.", remedy="refund"),
        line(
            "a", 3, "customer", "Fine, bye.", final=True, end_reason="goodbye", outcome="resolved"
        ),
        # a loop: no fact, no remedy, the customer speaks like the agent and mirrors the agent
        line("b", 0, "agent", hello, mood="calm"),
        line("b", 1, "customer", "Thank you for contacting us! How can I help you, Dana?", "calm"),
        line("b", 2, "agent", "Please tell me what is wrong with it today.", "calm"),
        line(
            "b",
            3,
            "customer",
            "Please tell me what is wrong with it today.",
            "calm",
            final=True,
            end_reason="loop",
        ),
        # still going: its lines count for the per-reply figures only
        line("c", 0, "agent", hello),
        line("c", 1, "customer", "It was delivered 23 days ago and it is broken."),
    ]
    figures, out = score(tmp_path, messages)
    assert figures["ended"] == "2" and figures["model"] == "test-model"
    assert out.strip().splitlines()[-1].startswith("RESULT quality ratio=0.50 target=0.9")
    assert figures["gives_detail"] == "0.50" and figures["offers_remedy"] == "0.50"
    # 1 of 7 replies mirrors the message it answers; 1 of 5 customer lines sounds like an
    # agent, and the same line names the customer itself
    assert figures["mirrors"] == "0.14"
    assert figures["agent_voice"] == "0.20" and figures["self_address"] == "0.20"
    assert figures["remedy_in_text"] == "1.00"
    assert "angry: {'resolved': 1}" in out and "calm: {'loop': 1}" in out


def test_the_shipped_labels_are_compared_with_the_recorded_outcomes(tmp_path: Path):
    labels = json.loads((REPO_ROOT / "bench" / "data" / "quality-labels.json").read_text())
    run = REPO_ROOT / "bench" / "data" / "quality-run.jsonl"
    messages = [json.loads(x) for x in run.read_text(encoding="utf-8").splitlines() if x]
    last = {m["conversation_id"]: m["text"] for m in messages if m["final"]}
    assert len(labels) >= 10
    assert all(last.get(cid) == label["last"] for cid, label in labels.items())
    assert {label["outcome"] for label in labels.values()} <= {
        "resolved",
        "unresolved",
        "gave_up",
        "none",
    }
    figures, out = score(tmp_path, messages)
    assert f"hand-labelled conversations in this run: {len(labels)}" in out
    assert 0.0 <= float(figures["outcome_agreement"]) <= 1.0
