"""Dataset rows built from scored conversations, and the live dataset sink.

The row shapes here are shared by `supportsim export` (a one-off dump of `chat-scored`) and the
optional `dataset_sink` service (appends every finished conversation as it happens):

- a message row: one scored message, nested fields flattened (`customer.name` -> `customer_name`,
  `sentiment.score` -> `sentiment_score`), extra fields kept;
- a conversation row: one summary per conversation (persona, turns, end reason, completeness,
  sentiment statistics, tokens, duration);
- a chat record: the conversation as `{role, content}` messages for fine-tuning tools, the support
  agent as `assistant`, the customer as `user`, after a `system` line built only from what a
  production agent sees (its own name and the customer's name, never the customer's mood or card).

A conversation that ended in `error` or `loop` is not complete unless the caller asks to include
those endings. The line a bot writes when a conversation ends in `error` is not a chat turn: its
text is left out of message rows, of sentiment statistics and of chat records.

The sink writes JSON Lines crash-safely: each batch is appended, flushed and fsynced, then the
committed sizes of the files are recorded atomically in `.committed.json`. On start (and before
every batch) anything past the recorded sizes is a torn or unconfirmed write and is cut off;
conversations already committed are never written twice.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

logger = logging.getLogger(__name__)

MESSAGE_COLUMNS = [
    "conversation_id",
    "message_id",
    "turn",
    "role",
    "text",
    "timestamp_ms",
    "customer_name",
    "customer_mood",
    "customer_product",
    "agent_name",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "final",
    "end_reason",
    "sentiment_label",
    "sentiment_score",
    "sentiment_model",
]
POSITION_COLUMNS = ["kafka_partition", "kafka_offset"]
COMPLETE_COLUMN = "conversation_complete"

CONVERSATION_COLUMNS = [
    "conversation_id",
    "customer_name",
    "customer_mood",
    "customer_product",
    "agent_name",
    "turns",
    "first_turn",
    "last_turn",
    "end_reason",
    "complete",
    "incomplete_reason",
    "first_sentiment",
    "last_sentiment",
    "mean_sentiment",
    "min_sentiment",
    "customer_first_sentiment",
    "customer_last_sentiment",
    "customer_sentiment_change",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "started_ms",
    "ended_ms",
    "duration_ms",
    "chat_models",
    "sentiment_models",
]

ROLE_IN_CHAT = {"agent": "assistant", "customer": "user"}
PERSONA_COLUMNS = ("customer_name", "customer_mood", "customer_product", "agent_name")
# the only persona facts a chat record carries: what the agent is told in production
AGENT_VISIBLE_COLUMNS = ("agent_name", "customer_name")
# endings that are not a finished conversation (a failure, or a model repeating itself)
FAILED_ENDINGS = ("error", "loop")


def is_error_line(row: dict[str, Any]) -> bool:
    """True for the line a bot writes when a conversation ends in `error` (no model text)."""
    return bool(row.get("final")) and row.get("end_reason") == "error"


def flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects flattened into one level, keys joined with `_` (`customer_name`)."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            flat.update(flatten(item, f"{name}_"))
        else:
            flat[name] = item
    return flat


def message_row(message: dict[str, Any], partition: int, offset: int) -> dict[str, Any]:
    """One scored message (its JSON dict) as a flat row: contract columns, extras, position.

    Contract columns come first in a fixed order, then any extra fields in sorted order, then
    where the message was read (`kafka_partition`, `kafka_offset`).
    """
    flat = flatten(message)
    row = {column: flat.pop(column, None) for column in MESSAGE_COLUMNS}
    for name in sorted(flat):
        if name not in POSITION_COLUMNS and name != COMPLETE_COLUMN:
            row[name] = flat[name]
    row["kafka_partition"] = partition
    row["kafka_offset"] = offset
    if is_error_line(row):
        row["text"] = None  # the bot's failure notice, not something either side said
    return row


def extra_columns(row: dict[str, Any]) -> list[str]:
    """The columns of a message row that the contract does not define."""
    known = {*MESSAGE_COLUMNS, *POSITION_COLUMNS, COMPLETE_COLUMN}
    return [name for name in row if name not in known]


def _round(value: float | None) -> float | None:
    # six decimals: enough for a score in [-1, 1], and stable text in CSV and JSON
    return None if value is None else round(value, 6)


def _span(turns: list[int]) -> str:
    if len(turns) > 6:
        return ", ".join(map(str, turns[:5])) + f" and {len(turns) - 5} more"
    return ", ".join(map(str, turns))


def incompleteness(rows: list[dict[str, Any]], include_failed_endings: bool = False) -> list[str]:
    """Why a conversation (its message rows, in turn order) is not whole; empty when it is.

    An `error` or `loop` ending makes it incomplete unless `include_failed_endings`.
    """
    problems = []
    turns = [row["turn"] for row in rows]
    repeated = sorted(turn for turn, count in Counter(turns).items() if count > 1)
    missing = sorted(set(range(max(turns) + 1)) - set(turns))
    if missing:
        problems.append(f"missing turns {_span(missing)}")
    if repeated:
        problems.append(f"repeated turns {_span(repeated)}")
    finals = [row for row in rows if row["final"]]
    if not finals:
        problems.append("no final message")
    elif len(finals) > 1 or finals[-1] is not rows[-1]:
        problems.append("messages after the final one")
    elif finals[-1]["end_reason"] in FAILED_ENDINGS and not include_failed_endings:
        problems.append(f"ended by {finals[-1]['end_reason']}")
    if len({tuple(row[c] for c in PERSONA_COLUMNS) for row in rows}) > 1:
        problems.append("persona changed during the conversation")
    return problems


def summarize(rows: list[dict[str, Any]], include_failed_endings: bool = False) -> dict[str, Any]:
    """The summary row of one conversation from its message rows (any order, at least one).

    `complete` is true when turns run 0..n without gaps or repeats, the last one is final and
    the ending is not `error` or `loop` (those count with `include_failed_endings`); otherwise
    `incomplete_reason` says what is wrong. Sentiment statistics leave out the error line.
    Sentiment change is the customer's last score minus the customer's first (positive: the
    customer ended happier).
    """
    ordered = sorted(rows, key=lambda row: row["turn"])
    first, last = ordered[0], ordered[-1]
    problems = incompleteness(ordered, include_failed_endings)
    spoken = [row for row in ordered if not is_error_line(row)] or ordered
    scores = [row["sentiment_score"] for row in spoken]
    customer = [row["sentiment_score"] for row in spoken if row["role"] == "customer"]
    prompt = sum(row["prompt_tokens"] or 0 for row in ordered)
    completion = sum(row["completion_tokens"] or 0 for row in ordered)
    times = [row["timestamp_ms"] for row in ordered]
    finals = [row for row in ordered if row["final"]]
    return {
        "conversation_id": first["conversation_id"],
        **{column: first[column] for column in PERSONA_COLUMNS},
        "turns": len(ordered),
        "first_turn": first["turn"],
        "last_turn": last["turn"],
        "end_reason": finals[-1]["end_reason"] if finals else None,
        "complete": not problems,
        "incomplete_reason": "; ".join(problems),
        "first_sentiment": _round(scores[0]),
        "last_sentiment": _round(scores[-1]),
        "mean_sentiment": _round(sum(scores) / len(scores)),
        "min_sentiment": _round(min(scores)),
        "customer_first_sentiment": _round(customer[0]) if customer else None,
        "customer_last_sentiment": _round(customer[-1]) if customer else None,
        "customer_sentiment_change": _round(customer[-1] - customer[0]) if customer else None,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "started_ms": min(times),
        "ended_ms": max(times),
        "duration_ms": max(times) - min(times),
        "chat_models": "|".join(sorted({str(row["model"]) for row in ordered})),
        "sentiment_models": "|".join(sorted({str(row["sentiment_model"]) for row in ordered})),
    }


def system_line(summary: dict[str, Any]) -> str:
    """The system message of a chat record: the agent's name and the customer's name only."""
    visible = {column: summary[column] for column in AGENT_VISIBLE_COLUMNS}
    return (
        f"You are {visible['agent_name']}, a customer support agent. You are chatting with "
        f"{visible['customer_name']}."
    )


def chat_record(summary: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One conversation as a fine-tuning example: agent = assistant, customer = user.

    Built from an allow-list, so a field added to the messages later (the customer's card, an
    outcome) never reaches the agent's training line: each turn is `{role, content}` from the
    message's role and text, the error line is left out, and the system line names only the
    agent and the customer. `conversation_id` and `complete` let a user join the other files
    or drop incomplete examples.
    """
    ordered = sorted(rows, key=lambda row: row["turn"])
    return {
        "conversation_id": summary["conversation_id"],
        "complete": summary["complete"],
        "messages": [
            {"role": "system", "content": system_line(summary)},
            *(
                {"role": ROLE_IN_CHAT[row["role"]], "content": row["text"]}
                for row in ordered
                if not is_error_line(row)
            ),
        ],
    }


def jsonl(row: dict[str, Any]) -> str:
    """One JSON Lines line (with its newline), keys in the row's own order."""
    return json.dumps(row, ensure_ascii=False) + "\n"


# --- the live sink ------------------------------------------------------------------------
