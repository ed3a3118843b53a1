"""conversation_starter: a one-shot job that starts the target number of conversations."""

from supportsim.bots.runner import BotSettings, seed_conversations
from supportsim.logs import configure_logging

if __name__ == "__main__":
    settings = BotSettings(service_name="conversation_starter")
    configure_logging(settings.log_level, settings.service_name)
    seed_conversations(settings)
