"""The chat model as a client of an OpenAI-compatible chat-completions server.

``LLM_BACKEND=openai``, for vLLM, llama.cpp's server, Ollama or a hosted endpoint:
:class:`ServerChatLLM` sends each turn's messages through LangChain's ``ChatOpenAI`` and reads
the token counts from the server's ``usage``. It has the interface of
:class:`~supportsim.bots.llm.ChatLLM`, so the turn logic, memory trimming and replies are the
same on both backends. The server applies its own chat template; history is trimmed to
``LLM_N_CTX`` with an estimate of the tokens (no tokenizer here), erring on the long side.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import httpx
from langchain_core.messages import BaseMessage

from supportsim.bots.llm import Completion, FatalSetupError, LLMConfig, clean_reply
from supportsim.logs import redacted

logger = logging.getLogger(__name__)

# characters per token assumed when trimming: fewer than real tokenizers average, so the
# estimate stays above the true count and the prompt inside the context
CHARS_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 8
PROBE_TIMEOUT_S = 10.0


class ServerAuthError(FatalSetupError):
    """The server refused the API key: nothing will work until LLM_API_KEY is fixed."""


class ServerChatLLM:
    """A chat model behind an OpenAI-compatible server. Create it with :meth:`connect`."""

    def __init__(self, chat: Any, config: LLMConfig, model_name: str) -> None:
        self._chat = chat
        self.config = config
        self._model_name = model_name
        # the response_format form this server takes, asked at the first structured turn
        self._response_form: str | None = None

    @classmethod
    def connect(cls, config: LLMConfig) -> ServerChatLLM:
        """Check the server and key once (a refused key raises :class:`ServerAuthError`)."""
        from langchain_openai import ChatOpenAI

        if not config.base_url:
            raise FatalSetupError(
                "LLM_BACKEND=openai needs LLM_BASE_URL (e.g. http://gpu-host:8000/v1)"
            )
        model = _probe(config)
        key = config.api_key.get_secret_value() if config.api_key else "none"
        chat = ChatOpenAI(
            model=model,
            base_url=config.base_url,
            api_key=key,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            # the openai client retries connection errors, 408, 429 and 5xx with backoff
            max_retries=config.request_retries,
            timeout=config.request_timeout_s,
        )
        logger.info("chat model %s at %s", model, redacted(config.base_url))
        return cls(chat, config, model)

    @property
    def model_name(self) -> str:
        """The name reported in each chat message's `model` field."""
        return self._model_name

    @property
    def max_prompt_tokens(self) -> int:
        """How many prompt tokens a turn may use so the reply still fits the context."""
        return self.config.max_prompt_tokens

    def count_tokens(self, messages: Sequence[BaseMessage]) -> int:
        """An upper estimate of the prompt tokens of `messages` (the tokenizer is remote)."""
        if not messages:
            return 0
        text = sum(math.ceil(len(str(m.content)) / CHARS_PER_TOKEN) for m in messages)
        return text + MESSAGE_OVERHEAD_TOKENS * (len(messages) + 1)

    def reply(
        self,
        messages: Sequence[BaseMessage],
        *,
        stop: Sequence[str] = (),
        labels: Sequence[str] = (),
        temperature: float | None = None,
        seed: int | None = None,
        repeat_penalty: float | None = None,
        conversation: str = "",
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        """Generate the next line after `messages` on the server.

        The server formats the prompt and reuses its prefix cache by itself, so `conversation`
        is not needed; `repeat_penalty` is not part of the chat-completions API and is not sent.
        `schema` constrains the output through the request's ``response_format`` (the OpenAI
        ``json_schema`` form, or llama.cpp's ``json_object`` + schema form for a server that
        refuses the first); the reply's text is then the raw JSON, for the caller to parse.
        Raises the openai client's error when the server still fails after its retries.
        """
        overrides: dict[str, Any] = {"stop": list(dict.fromkeys(stop)) or None}
        if temperature is not None:
            overrides["temperature"] = temperature
        if seed is not None or self.config.seed >= 0:
            overrides["seed"] = seed if seed is not None else self.config.seed
        started = time.perf_counter()
        if schema is None:
            message = self._chat.invoke(list(messages), **overrides)
        else:
            message = self._structured_invoke(list(messages), schema, overrides)
        latency_ms = round((time.perf_counter() - started) * 1000)
        raw = str(message.content)
        metadata = message.response_metadata or {}
        usage = message.usage_metadata or {}
        prompt_tokens = int(usage.get("input_tokens") or 0) or self.count_tokens(messages)
        cached = (usage.get("input_token_details") or {}).get("cache_read")
        finish_reason = metadata.get("finish_reason")
        return Completion(
            text=raw.strip()
            if schema is not None
            else clean_reply(
                raw, labels, self.config.max_reply_chars, truncated=finish_reason == "length"
            ),
            prompt_tokens=prompt_tokens,
            completion_tokens=int(usage.get("output_tokens") or 0),
            latency_ms=latency_ms,
            finish_reason=finish_reason,
            raw_text=raw,
            evaluated_prompt_tokens=None if cached is None else max(0, prompt_tokens - cached),
        )

    def _structured_invoke(
        self, messages: list[BaseMessage], schema: dict[str, Any], overrides: dict[str, Any]
    ) -> Any:
        """One request with `schema` as its response format, in the form the server takes."""
        if self._response_form is None:
            self._response_form = _response_form(self.config, self._model_name)
        if self._response_form == "json_schema":
            response_format: dict[str, Any] = {
                "type": "json_schema",
                "json_schema": {"name": "turn", "schema": schema, "strict": True},
            }
        else:
            response_format = {"type": "json_object", "schema": schema}
        return self._chat.invoke(messages, response_format=response_format, **overrides)


def _response_form(config: LLMConfig, model: str) -> str:
    """Which response format the server takes: OpenAI's ``json_schema``, or ``json_object``
    with a ``schema`` (llama.cpp's server), asked once with a one-token request."""
    headers = {}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "{}"}],
        "max_tokens": 1,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "probe", "schema": {"type": "object"}},
        },
    }
    url = config.base_url.rstrip("/") + "/chat/completions"
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=config.request_timeout_s)
    except httpx.HTTPError:
        return "json_schema"  # not reachable now: the standard form, the requests will retry
    if response.is_success or "response_format" not in response.text:
        return "json_schema"
    logger.info("%s takes json_object response formats, not json_schema", redacted(url))
    return "json_object"


def _probe(config: LLMConfig) -> str:
    """The model to ask for: LLM_MODEL, or the server's only model when LLM_MODEL is unset.

    A refused key is fatal; a server not reachable yet is only logged (turns retry).
    """
    headers = {}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
    url = config.base_url.rstrip("/") + "/models"
    try:
        response = httpx.get(url, headers=headers, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        logger.warning(
            "%s is not reachable yet (%s); turns will retry", redacted(url), type(exc).__name__
        )
        return config.model
    if response.status_code in (401, 403):
        raise ServerAuthError(
            f"{redacted(config.base_url)} refused the API key (HTTP {response.status_code}): "
            "set LLM_API_KEY to a key the server accepts"
        )
    served: list[str] = []
    if response.is_success:
        try:
            served = [str(m["id"]) for m in response.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            served = []
    if "model" not in config.model_fields_set and len(served) == 1:
        return served[0]
    if served and config.model not in served:
        logger.warning(
            "the server lists %s, not LLM_MODEL=%s; asking for it anyway",
            ", ".join(served),
            config.model,
        )
    return config.model
