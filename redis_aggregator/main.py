"""Redis aggregator: live per-conversation and fleet aggregates of the scored chat stream.

Reads `chat-scored`, keeps the aggregates in Kafka-backed state and writes them to Redis; also
counts the `chat` and dead-letter topics into the `pipeline` key (keys in docs/redis-keys.md).
Wiring only; the logic lives in `supportsim.sinks.live_view`.
"""

from supportsim.logs import configure_logging
from supportsim.sinks.live_view import AggregatorSettings, build_aggregator


def main() -> None:
    """Read settings from the environment, build the aggregator and run it until SIGTERM."""
    settings = AggregatorSettings()
    configure_logging(settings.log_level, settings.service_name)
    build_aggregator(settings).run()


if __name__ == "__main__":
    main()
