"""sentiment_analysis: scores every chat message and writes it to `chat-scored`."""

from supportsim.sentiment.service import run_sentiment_service

if __name__ == "__main__":
    run_sentiment_service()
