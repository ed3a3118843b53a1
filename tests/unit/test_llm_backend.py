"""The openai backend's settings: a missing server URL is a setup error the bot exits on."""

import pytest

from supportsim.bots.llm import FatalSetupError, LLMConfig
from supportsim.bots.server import ServerChatLLM


def test_the_openai_backend_without_a_url_is_a_clear_setup_error():
    with pytest.raises(FatalSetupError, match="needs LLM_BASE_URL"):
        ServerChatLLM.connect(LLMConfig(backend="openai", base_url=""))
