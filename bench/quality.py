"""Benchmark: how well the LLM conversations go — repeats, loops, errors, turns.

Runs `supportsim up`'s stack (see bench/bots.py) with three conversations for a fixed time after
the first reply, then reads every message back: the share of replies that repeat an earlier message
of their conversation (the near-duplicate check the bots use), the share of ended conversations
that ended in `loop` or `error`, and the average number of turns. Two figures of how well the
customer keeps its role: the share of customer replies in the agent's voice (`agent_voice`, the
check the customer bot retries on) and the share of conversations whose first customer message
names the product in the customer's own voice (`opens_with_problem`).

Usage: .venv/bin/python bench/quality.py [--quick] [--model ...] [--seconds N] [--from chat.jsonl]
Last line: RESULT quality ratio=<share ending normally> target=0.9 repeats=... loops=... errors=...
agent_voice=... opens_with_problem=...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bots import by_conversation, run_stack  # noqa: E402

from supportsim.bots.loops import is_near_duplicate, sounds_like_agent  # noqa: E402


def main() -> None:
    """Run the bots and print the quality figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2, 150 s (< 5 min)")
    parser.add_argument("--model")
    parser.add_argument("--seconds", type=float)
    parser.add_argument(
        "--from",
        dest="saved",
        type=Path,
        help="score the chat.jsonl an earlier run kept in its work folder; runs no bots",
    )
    args = parser.parse_args()
    model = args.model or ("smollm2-135m" if args.quick else "qwen2.5-1.5b")
    if args.saved:
        lines = args.saved.read_text(encoding="utf-8").splitlines()
        messages = [json.loads(line) for line in lines if line.strip()]
        model = next((m["model"] for m in messages if m["turn"] > 0), model)
    else:
        seconds = args.seconds or (150 if args.quick else 900)
        # `supportsim up`'s stack and bot layout, three conversations at once
        settings = {"CONVERSATIONS": "3", "MAX_TURNS": "8" if args.quick else "12"}
        messages = run_stack("quality", model, seconds, settings=settings).messages
    report(messages, model)


def report(messages: list[dict], model: str) -> None:
    """Print the quality figures of a run's chat messages, ending with the RESULT line."""
    conversations = by_conversation(messages)
    replies = repeats = 0
    for conversation in conversations.values():
        for i, m in enumerate(conversation):
            if m["turn"] == 0 or m["end_reason"] == "error":
                continue
            replies += 1
            repeats += is_near_duplicate(m["text"], [e["text"] for e in conversation[:i]])
    customer = [
        m for c in conversations.values() for m in c if m["role"] == "customer" and m["text"]
    ]
    agent_voice = sum(sounds_like_agent(m["text"]) for m in customer) / max(1, len(customer))
    firsts = [next((m for m in c if m["role"] == "customer"), None) for c in conversations.values()]
    firsts = [m for m in firsts if m is not None and m["end_reason"] != "error"]
    opened = sum(
        m["customer"]["product"].lower() in m["text"].lower() and not sounds_like_agent(m["text"])
        for m in firsts
    )
    ended = [c for c in conversations.values() if c[-1]["final"]]
    reasons = Counter(c[-1]["end_reason"] for c in ended)
    normal = sum(n for r, n in reasons.items() if r not in {"loop", "error"})
    turns = sum(len(c) for c in ended) / len(ended) if ended else 0.0
    ratio = normal / len(ended) if ended else 0.0
    print(f"conversations ended: {len(ended)} {dict(reasons)}; replies checked: {replies}")
    print(
        f"RESULT quality ratio={ratio:.2f} target=0.9 repeats={repeats / max(1, replies):.2f} "
        f"loops={reasons['loop'] / max(1, len(ended)):.2f} "
        f"errors={reasons['error'] / max(1, len(ended)):.2f} avg_turns={turns:.1f} "
        f"agent_voice={agent_voice:.2f} opens_with_problem={opened / max(1, len(firsts)):.2f} "
        f"ended={len(ended)} model={model}"
    )


if __name__ == "__main__":
    main()
