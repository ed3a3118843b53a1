"""bench/quality.py scores a saved run: the figures it prints follow from the messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from supportsim.stack import REPO_ROOT

CUSTOMER = {"name": "Dana Reyes", "mood": "angry", "product": "laptop"}


def line(conversation: str, turn: int, role: str, text: str, **extra) -> dict:
    return {
        "conversation_id": conversation,
        "message_id": f"{conversation}-{turn}",
        "turn": turn,
        "role": role,
        "text": text,
        "customer": CUSTOMER,
        "agent": {"name": "Sam"},
        "model": "template" if turn == 0 else "test-model",
        "final": False,
        "end_reason": None,
        **extra,
    }


def test_a_saved_run_is_scored_without_running_bots(tmp_path: Path):
    hello = "Hi Dana, Sam here. How can I help?"
    messages = [
        # ends normally: the customer opens with its laptop in its own voice
        line("a", 0, "agent", hello),
        line("a", 1, "customer", "My laptop will not start and I want a refund."),
        line("a", 2, "agent", "Refund sent. Anything else I can help with?"),
        line("a", 3, "customer", "Thanks, bye!", final=True, end_reason="goodbye"),
        # ends in a loop, the customer speaking like the agent
        line("b", 0, "agent", hello),
        line("b", 1, "customer", "Thank you for reaching out! How can I assist you today?"),
        line("b", 2, "agent", "You are the customer, Dana. What is wrong?"),
        line("b", 3, "customer", "What is wrong?", final=True, end_reason="loop"),
        # still going: counted for the voice figures, not for the endings
        line("c", 0, "agent", hello),
        line("c", 1, "customer", "The screen of my laptop flickers."),
    ]
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
    figures = dict(field.split("=", 1) for field in result.split()[2:])
    assert result.startswith("RESULT quality ratio=0.50 target=0.9")
    assert figures["loops"] == "0.50" and figures["ended"] == "2"
    # 1 of 5 customer lines in the agent's voice; 2 of 3 first lines name the laptop as customer
    assert figures["agent_voice"] == "0.20"
    assert figures["opens_with_problem"] == "0.67"
    assert figures["model"] == "test-model"
