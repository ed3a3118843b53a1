"""Through the real broker: topics with explicit configs, a round trip, dead-letter routing."""

import json
import subprocess
import sys

from confluent_kafka.admin import AdminClient, ConfigResource

from supportsim.contract.messages import ChatMessage
from supportsim.kafka.app import make_app
from supportsim.kafka.dead_letters import validated
from supportsim.settings import ServiceSettings
from tests.support import chat_message, produce, produce_json, read_topic, values


def test_topics_are_created_with_partitions_and_retention(service_env, broker):
    settings = ServiceSettings()
    make_app(settings, group="topic-test")
    admin = AdminClient({"bootstrap.servers": broker})
    metadata = admin.list_topics(timeout=10)
    assert len(metadata.topics[settings.chat_topic].partitions) == settings.chat_partitions
    assert len(metadata.topics[settings.dead_letter_topic].partitions) == 1
    resource = ConfigResource("topic", settings.chat_topic)
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    assert configs["retention.ms"].value == str(settings.topic_retention_ms)
    assert configs["retention.bytes"].value == str(settings.topic_retention_bytes)


def test_produce_consume_round_trip_keeps_order_per_conversation(service_env, broker):
    settings = ServiceSettings()
    make_app(settings, group="roundtrip")
    conversation = chat_message()["conversation_id"]
    sent = [chat_message(conversation, turn=t) for t in range(20)]
    produce_json(broker, settings.chat_topic, sent)
    got = values(read_topic(broker, settings.chat_topic, until=20))
    assert [m["turn"] for m in got] == list(range(20))
    assert got == sent


def test_bad_values_go_to_dead_letters_and_the_consumer_keeps_going(service_env, broker):
    settings = ServiceSettings()
    app, topics = make_app(settings, group="dlq-test")
    good_before = chat_message()
    missing_id = {k: v for k, v in chat_message().items() if k != "conversation_id"}
    good_after = chat_message()
    produce(
        broker,
        settings.chat_topic,
        [
            (good_before["conversation_id"].encode(), json.dumps(good_before).encode()),
            (b"k1", b'{"conversation_id": "broken'),
            (b"k2", json.dumps(missing_id).encode()),
            (good_after["conversation_id"].encode(), json.dumps(good_after).encode()),
        ],
    )
    sdf = validated(app.dataframe(topics.chat), ChatMessage, topics, "dlq-test")
    sdf.to_topic(topics.scored)
    app.run(count=4, timeout=60)
    forwarded = values(read_topic(broker, settings.scored_topic, until=2))
    assert {m["message_id"] for m in forwarded} == {
        good_before["message_id"],
        good_after["message_id"],
    }
    dead = sorted(
        values(read_topic(broker, settings.dead_letter_topic, until=2)), key=lambda d: d["key"]
    )
    assert [d["key"] for d in dead] == ["k1", "k2"]
    assert "not JSON" in dead[0]["error"]
    assert "conversation_id" in dead[1]["error"] and "Field required" in dead[1]["error"]
    assert dead[0]["value"] == '{"conversation_id": "broken'
    assert all(
        d["source_topic"] == settings.chat_topic and d["service"] == "dlq-test" for d in dead
    )


CRASHING_PRODUCER = """
import json, os, sys, time
from confluent_kafka import Producer
producer = Producer({"bootstrap.servers": sys.argv[1], "transactional.id": sys.argv[2]})
producer.init_transactions()
producer.begin_transaction()
value = json.loads(sys.argv[4])
producer.produce(sys.argv[3], key=value["conversation_id"].encode(), value=sys.argv[4].encode())
producer.flush()
print("open", flush=True)
time.sleep(600)  # killed here, its transaction still open
"""


def test_a_restarted_replica_unblocks_readers_its_killed_predecessor_held_up(
    service_env, broker, monkeypatch
):
    """A replica killed mid-transaction leaves it open (Tansu never times it out): readers of
    that partition see nothing after it. The restarted replica (same REPLICA_INDEX) ends it at
    startup, before it has anything to write."""
    monkeypatch.setenv("REPLICA_INDEX", "0")
    settings = ServiceSettings()
    make_app(settings, group="topic-setup", exactly_once=False)
    transactional_id = settings.transactional_id_for(settings.group("restart-test"))
    stuck = chat_message()
    crashed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CRASHING_PRODUCER,
            broker,
            transactional_id,
            settings.chat_topic,
            json.dumps(stuck),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert crashed.stdout.readline().strip() == "open"
    finally:
        crashed.kill()
        crashed.wait()
    later = chat_message(stuck["conversation_id"], turn=1)
    produce_json(broker, settings.chat_topic, [later])
    committed = "read_committed"  # Kafka's semantics: readers wait behind an open transaction
    assert read_topic(broker, settings.chat_topic, until=1, timeout=8, isolation=committed) == []

    make_app(ServiceSettings(), group="restart-test")  # the replica comes back

    got = values(read_topic(broker, settings.chat_topic, until=2, timeout=30, isolation=committed))
    assert [m["message_id"] for m in got] == [stuck["message_id"], later["message_id"]]
