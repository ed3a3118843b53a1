"""Settings come from the environment only, with local defaults, and keep secrets secret."""

from supportsim.kafka.app import connection
from supportsim.settings import KafkaSettings, RedisSettings, ServiceSettings


def test_defaults_run_locally(monkeypatch):
    for name in ["CHAT_TOPIC", "KAFKA_BROKER_ADDRESS", "REDIS_URL", "Quix__Sdk__Token"]:
        monkeypatch.delenv(name, raising=False)
    settings = ServiceSettings()
    assert (settings.chat_topic, settings.scored_topic, settings.dead_letter_topic) == (
        "chat",
        "chat-scored",
        "chat-dead-letters",
    )
    assert settings.kafka.broker_address == "localhost:9092"
    assert RedisSettings().redis_url.get_secret_value().startswith("redis://127.0.0.1:6379")


def test_everything_is_read_from_env(monkeypatch):
    monkeypatch.setenv("CHAT_TOPIC", "c1")
    monkeypatch.setenv("CHAT_PARTITIONS", "8")
    monkeypatch.setenv("CONSUMER_GROUP", "g1")
    monkeypatch.setenv("CONSUMER_GROUP_PREFIX", "p-")
    monkeypatch.setenv("KAFKA_BROKER_ADDRESS", "kafka:9092")
    monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", "6000")
    settings = ServiceSettings()
    assert settings.chat_topic == "c1" and settings.chat_partitions == 8
    assert settings.group("default") == "p-g1"
    assert settings.kafka.broker_address == "kafka:9092"
    assert settings.kafka.session_timeout_ms == 6000


def test_sasl_and_tls_options_reach_the_connection(monkeypatch):
    monkeypatch.delenv("Quix__Sdk__Token", raising=False)
    monkeypatch.setenv("KAFKA_BROKER_ADDRESS", "broker:9093")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "user")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "s3cret-value")
    monkeypatch.setenv("KAFKA_SSL_CA_LOCATION", "/etc/ca.pem")
    config = connection(ServiceSettings().kafka).as_librdkafka_dict()
    assert config["bootstrap.servers"] == "broker:9093"
    assert config["security.protocol"] == "sasl_ssl"
    assert config["sasl.mechanism"] == "SCRAM-SHA-256"
    assert config["sasl.password"] == "s3cret-value"
    assert config["ssl.ca.location"] == "/etc/ca.pem"
    assert "s3cret-value" not in repr(KafkaSettings())


def test_quix_cloud_token_lets_quix_streams_connect(monkeypatch):
    monkeypatch.setenv("Quix__Sdk__Token", "sdk-token")
    assert KafkaSettings().on_quix_cloud
    assert connection(ServiceSettings().kafka) is None


def test_redis_url_is_secret_in_repr(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:pw123@redis:6379/0")
    assert "pw123" not in repr(RedisSettings())


def test_each_quix_replica_has_its_own_transactional_id_that_survives_a_restart(monkeypatch):
    for name in ["TRANSACTIONAL_ID", "REPLICA_INDEX"]:
        monkeypatch.delenv(name, raising=False)
    ids = {}
    for replica, pid in [("ai-customer-0", 1), ("ai-customer-0", 7), ("ai-customer-1", 1)]:
        monkeypatch.setenv("Quix__Deployment__ReplicaName", replica)
        monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
        ids.setdefault(replica, set()).add(ServiceSettings().transactional_id_for("bots"))
    assert ids == {"ai-customer-0": {"bots-ai-customer-0"}, "ai-customer-1": {"bots-ai-customer-1"}}
