"""ai_customer: the difficult customer, answering the support agent over Kafka."""

from supportsim.bots.runner import run_bot

if __name__ == "__main__":
    run_bot("customer")
