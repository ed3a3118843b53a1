"""The conversation protocol: ids derived from conversations and the turn-order rule."""

from __future__ import annotations

import uuid

CONVERSATION_NAMESPACE = uuid.UUID("6f1d7c2e-3b1a-4d8e-9a57-0c2f3e5d9b11")


def successor_id(conversation_id: str) -> str:
    """The id of the conversation that replaces this one (deterministic, so a redo repeats it)."""
    return str(uuid.uuid5(CONVERSATION_NAMESPACE, f"{conversation_id}/next"))


def turn_message_id(conversation_id: str, turn: int) -> str:
    """The message_id of a turn: one per turn, so a redone turn keeps the id of its first try."""
    return str(uuid.uuid5(CONVERSATION_NAMESPACE, f"{conversation_id}/{turn}"))


def slot_id(namespace: str, slot: int) -> str:
    """The id of the first conversation of seeding slot `slot` (re-seeding repeats it)."""
    return str(uuid.uuid5(CONVERSATION_NAMESPACE, f"{namespace}/slot/{slot}"))


def turn_order_problem(
    turn: int,
    last_turn: int | None,
    ended: bool = False,
    end_reason: str | None = None,
    max_gap: int = 0,
) -> str | None:
    """Why `turn` breaks the order of its conversation, which is at `last_turn` (None: unknown).

    None when it fits: the next turn of a conversation in progress, turn 0 of a new one, or a
    turn already seen (a duplicate, for the caller to ignore). A reader downstream of a dead
    letter passes `max_gap`: up to that many missing turns of an open conversation are accepted,
    so one dead-lettered turn does not take the rest of its conversation with it. The bots and
    the aggregator both dead-letter what this names.
    """
    if last_turn is None:
        if turn == 0:
            return None
        return f"turn {turn} for an unknown conversation (it must start at turn 0)"
    if ended and turn > last_turn:
        reason = f" ({end_reason})" if end_reason else ""
        return f"turn {turn} after the conversation ended at turn {last_turn}{reason}"
    if turn > last_turn + 1 + max_gap:
        allowed = f" (or up to {max_gap} turns later)" if max_gap else ""
        return f"out-of-order turn {turn}: expected turn {last_turn + 1}{allowed}"
    return None
