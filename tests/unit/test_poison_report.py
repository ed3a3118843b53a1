"""The poison checker's verdicts: which service dead-lettered what, and why a letter is missing."""

from supportsim.contract.messages import DeadLetter
from tests.harness.poisons import Poison, poison_outcomes

SERVICES = frozenset({"redis_aggregator"})


def poison(offset: int) -> Poison:
    return Poison("invalid_json", "chat-scored", b"k", b"{", SERVICES, partition=3, offset=offset)


def letter(offset: int) -> DeadLetter:
    return DeadLetter(
        source_topic="chat-scored",
        partition=3,
        offset=offset,
        value="{",
        error="value is not JSON",
        service="redis_aggregator",
    )


def test_a_dead_letter_at_the_same_place_proves_the_poison_handled():
    [outcome] = poison_outcomes([poison(109)], [letter(109)], {})
    assert outcome.ok
    assert "ok" in outcome.line() and "value is not JSON" in outcome.line()


def test_a_missing_letter_says_whether_the_service_ever_logged_the_record():
    logs = {"redis_aggregator": "WARNING dead letter from chat-scored[3]@109: value is not JSON\n"}
    logged, unread = poison_outcomes([poison(109), poison(110)], [letter(111)], logs)
    assert not logged.ok and not unread.ok
    assert "MISSING ['redis_aggregator']" in logged.line()
    assert "logged as dead letter by ['redis_aggregator'] but not in the topic" in logged.line()
    assert "never read" in unread.line()
