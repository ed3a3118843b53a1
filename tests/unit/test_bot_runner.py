"""The bot runner: model-assembly progress as readable log lines; conversation state retention."""

import logging
from datetime import timedelta

from quixstreams.state.rocksdb import RocksDBStorePartition

from supportsim.bots.runner import _log_assembly
from supportsim.contract.messages import new_id, to_json


def test_model_assembly_progress_is_logged_at_each_tenth(caplog):
    progress = _log_assembly()
    with caplog.at_level(logging.INFO, logger="supportsim.bots.runner"):
        for done in range(0, 1_000_001, 50_000):
            progress(done, 1_000_000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "assembling the model: 0% of 1 MB"
    assert lines[-1] == "assembling the model: 100% of 1 MB"
    assert len(lines) == 11  # one line per tenth, not one per chunk


def test_a_conversation_is_forgotten_a_retention_after_its_last_message(tmp_path):
    """In a real Quix Streams state store (RocksDB), in event time, as the aggregator's state."""
    from supportsim.bots.conversation import BotConfig, opening_message
    from supportsim.bots.runner import STATE_KEY, BotSettings, conversation_step, load_opening
    from supportsim.bots.scripted import ScriptedResponder

    opening = load_opening(BotSettings())
    retention = timedelta(hours=1)
    config = BotConfig(role="customer", max_turns=6, service="ai_customer")
    step = conversation_step(config, ScriptedResponder(), opening, topics=None, retention=retention)
    store = RocksDBStorePartition(str(tmp_path / "state"))
    greeting = to_json(opening_message(new_id(), opening))
    key = greeting["conversation_id"].encode()
    t0 = greeting["timestamp_ms"]

    def deliver(message: dict) -> list[dict]:
        transaction = store.begin()
        out = step(message, transaction.as_state(prefix=key, timestamp=message["timestamp_ms"]))
        transaction.prepare()
        transaction.flush()
        return out

    def kept(at_ms: int) -> dict | None:
        return store.begin().as_state(prefix=key, timestamp=at_ms).get(STATE_KEY)

    [reply] = deliver(greeting)
    goodbye = {**reply, "message_id": new_id(), "turn": 2, "role": "agent", "text": "Goodbye!"}
    goodbye.update(final=True, end_reason="goodbye", timestamp_ms=t0 + 1000)
    assert deliver(goodbye) == []
    ended_ms = t0 + 1000
    assert kept(ended_ms + retention // timedelta(milliseconds=1) - 1)["ended"]
    assert kept(ended_ms + retention // timedelta(milliseconds=1) + 1) is None
    store.close()
