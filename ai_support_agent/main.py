"""ai_support_agent: the support agent, answering customers over Kafka."""

from supportsim.bots.runner import run_bot

if __name__ == "__main__":
    run_bot("agent")
