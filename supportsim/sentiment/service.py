"""The sentiment_analysis service: `chat` in, `chat-scored` out, batched when messages queue up.

Back-fill: run it with another model, consumer group and output topic, and it re-scores the
whole history from offset 0 while the live scorer keeps going, e.g.
`CONSUMER_GROUP=rescore-v2 SCORED_TOPIC=chat-scored-v2 SENTIMENT_MODEL=/models/v2
python sentiment_analysis/main.py`.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Message
from pydantic import Field

from supportsim.contract.messages import DeadLetter, ScoredMessage, dead_letter, parse_chat
from supportsim.kafka.app import make_app
from supportsim.kafka.batch_loop import BatchLoop, Output
from supportsim.kafka.topics import Topics
from supportsim.logs import configure_logging
from supportsim.settings import BUILTIN_SENTIMENT_MODEL, ServiceSettings

logger = logging.getLogger(__name__)


class SentimentSettings(ServiceSettings):
    """Settings of sentiment_analysis."""

    service_name: str = "sentiment_analysis"
    sentiment_model: str = Field(
        BUILTIN_SENTIMENT_MODEL,
        description="builtin (MiniLM fine-tuned on the shipped dataset), a local model folder or"
        " a Hugging Face model id.",
    )
    sentiment_batch_size: int = Field(32, description="Largest batch of messages scored at once.")
    sentiment_threads: int = Field(
        1, description="CPU threads of the sentiment model (leave cores to the bots)."
    )


def score_records(records: list[Message], scorer, topics: Topics, service: str) -> list[Output]:
    """Validate and score a batch; invalid values become dead letters, in input order."""
    parsed = [
        parse_chat(
            r.value(),
            service=service,
            source_topic=r.topic(),
            partition=r.partition(),
            offset=r.offset(),
            key=r.key(),
        )
        for r in records
    ]
    valid = [p for p in parsed if not isinstance(p, DeadLetter)]
    sentiments = iter(scorer.score_batch([m.text for m in valid]) if valid else [])
    outputs = []
    for record, item in zip(records, parsed, strict=True):
        if isinstance(item, DeadLetter):
            logger.warning("dead letter at %s[%s]@%s: %s", *_where(record), item.error)
            outputs.append(Output(topics.dead_letters.name, record.key(), _json(item)))
            continue
        sentiment = next(sentiments)
        try:
            # a message scored before (re-scoring a scored topic) gets the new sentiment
            scored = ScoredMessage.model_validate({**item.model_dump(), "sentiment": sentiment})
        except ValueError as exc:  # never a poison pill: the record goes to dead letters
            dead = dead_letter(
                record.value(),
                f"cannot build the scored message: {exc}",
                service=service,
                source_topic=record.topic(),
                partition=record.partition(),
                offset=record.offset(),
                key=record.key(),
            )
            outputs.append(Output(topics.dead_letters.name, record.key(), _json(dead)))
            continue
        outputs.append(Output(topics.scored.name, item.key, _json(scored)))
    return outputs


def _where(record: Message) -> tuple:
    return record.topic(), record.partition(), record.offset()


def _json(model) -> bytes:
    return model.model_dump_json().encode()


def run_sentiment_service(settings: SentimentSettings | None = None) -> None:
    """Run the scorer until SIGTERM."""
    from supportsim.sentiment.model import Scorer

    settings = settings or SentimentSettings()
    configure_logging(settings.log_level, settings.service_name)
    app, topics = make_app(settings, group="sentiment-analysis")
    started = time.monotonic()
    scorer = Scorer(
        settings.sentiment_model, threads=settings.sentiment_threads, progress=logger.info
    )
    logger.info("model %s loaded in %.1f s", scorer.name, time.monotonic() - started)
    loop = BatchLoop(
        app,
        topics.chat.name,
        lambda records: score_records(records, scorer, topics, settings.service_name),
        max_batch=settings.sentiment_batch_size,
    )
    loop.run()
    logger.info("stopped after scoring %s messages in %s batches", loop.processed, loop.batches)
