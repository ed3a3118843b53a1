"""The chat model of a bot process: a local GGUF model run by llama.cpp through LangChain.

Load it once per process with :meth:`ChatLLM.load`; then :meth:`ChatLLM.reply` turns a list of chat
messages into one cleaned :class:`Completion` with its token counts and latency, and
:meth:`ChatLLM.count_tokens` measures a prompt with the model's own tokenizer (for memory trimming).

By default the GGUF's own chat template formats the prompt (LangChain's ``ChatLlamaCpp``).
Llama-2 chat models, whose GGUF files carry no template, are wrapped in langchain-experimental's
``Llama2Chat`` instead (``LLM_PROMPT_FORMAT=llama2``, or detected from the file name or metadata).
"""

from __future__ import annotations

import fcntl
import json
import logging
import random
import re
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from supportsim.bots.conversation import Decision
from supportsim.bots.models import DEFAULT_MODEL, AssemblyProgress, ModelFile, resolve_model
from supportsim.contract.messages import MAX_TEXT_CHARS

logger = logging.getLogger(__name__)

PromptFormat = Literal["auto", "chat_template", "llama2"]
Backend = Literal["llamacpp", "openai"]

# end-of-turn markers of common chat templates: a model that writes one has finished its turn
TEMPLATE_END_TOKENS = (
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "[INST]",
)
# labels a model may put in front of its own line; always stripped, never part of a reply
GENERIC_SPEAKER_LABELS = ("customer", "agent", "support agent", "assistant", "user", "ai", "human")
LLAMA2_NAME = re.compile(r"llama[-_ ]?2", re.IGNORECASE)
# prompt tokens per message (role markers) assumed when a chat template cannot render a list
APPROXIMATE_MESSAGE_OVERHEAD = 8


class LLMConfig(BaseSettings):
    """How the model is loaded and sampled, read from ``LLM_*`` variables (``LLM_MODEL``, ...).

    Where the assembled or downloaded model files go is ``SUPPORTSIM_CACHE`` (see models.py).
    """

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore", frozen=True)

    backend: Backend = Field(
        "llamacpp",
        description="llamacpp (a GGUF model loaded in this process) or openai (an"
        " OpenAI-compatible chat-completions server at LLM_BASE_URL).",
    )
    base_url: str = Field(
        "",
        description="API root of the model server for LLM_BACKEND=openai, e.g."
        " http://gpu-host:8000/v1.",
    )
    api_key: SecretStr | None = Field(
        None, description="API key of the model server (LLM_BACKEND=openai): a secret."
    )
    concurrency: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Turns in flight per replica, each in a worker process of its own (each"
        " llamacpp worker loads the model); keep chat partitions >= replicas x this.",
    )
    prompt_cache_mb: int = Field(
        default=256,
        ge=0,
        description="RAM (MB) per process for saved llama.cpp states, one per conversation, least"
        " recently used evicted; 0 switches prompt reuse off.",
    )
    request_retries: int = Field(
        default=4,
        ge=0,
        le=10,
        description="openai backend: attempts after a failed request, with backoff.",
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="openai backend: time limit (s) of one request."
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="llamacpp: qwen2.5-1.5b, smollm2-135m, a .gguf path or hf:<repo>/<file>;"
        " openai: the server's model name.",
    )
    prompt_format: PromptFormat = Field(
        "auto",
        description="auto (the GGUF's chat template; Llama-2 files detected), chat_template or"
        " llama2.",
    )
    n_ctx: int = Field(default=2048, ge=256, description="Context window of the model (tokens).")
    n_threads: int | None = Field(
        default=None, ge=1, description="llama.cpp threads per bot process; unset: all cores."
    )
    core_lock: str = Field(
        "",
        description="llamacpp: path of a lock file the bot processes of one machine share, so"
        " one generates at a time with every thread of LLM_N_THREADS; empty: off.",
    )
    n_batch: int = Field(default=512, ge=8, description="llama.cpp prompt batch size (tokens).")
    max_tokens: int = Field(default=128, ge=8, description="Longest reply (tokens).")
    temperature: float = Field(default=0.8, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int = Field(default=40, ge=0, description="Top-k sampling (0: off).")
    repeat_penalty: float = Field(default=1.1, ge=1.0, description="Penalty on repeated tokens.")
    seed: int = Field(-1, description="Sampling seed (-1: random).")
    max_reply_chars: int = Field(
        default=800,
        ge=40,
        le=MAX_TEXT_CHARS,
        description="Longest reply kept (characters), cut at a sentence end where possible.",
    )
    context_margin: int = Field(
        default=16,
        ge=0,
        description="Tokens of the context kept free besides the reply budget (LLM_MAX_TOKENS).",
    )
    retries: int = Field(
        default=2,
        ge=0,
        le=5,
        description="Further attempts, each hotter, when a reply is empty or repeats an earlier"
        " line.",
    )
    # off by default: the measured replies carry fewer facts and remedies (README,
    # bench/quality.py)
    structured: bool = Field(
        False,
        description="true: each reply and its decision (end the chat? which remedy?) as"
        " schema-constrained JSON; false: free text, ended by goodbye words.",
    )

    @property
    def max_prompt_tokens(self) -> int:
        """The prompt budget: what is left of the context after the reply and a safety margin."""
        return self.n_ctx - self.max_tokens - self.context_margin


class FatalSetupError(RuntimeError):
    """A setting that makes every turn fail (e.g. a refused API key): the bot says so and exits."""


@dataclass(frozen=True)
class Completion:
    """One generated line: cleaned text plus what it cost."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int = 0
    finish_reason: str | None = None
    loop: bool = False
    attempts: int = 1
    raw_text: str = field(default="", repr=False)
    # prompt tokens the model actually read (the rest came from a saved state or server cache)
    evaluated_prompt_tokens: int | None = None
    # the structured decision of the turn (None when the model was not asked for one)
    decision: Decision | None = None

    @property
    def retried(self) -> bool:
        """True when the first attempt was empty or a repeat and the model was asked again."""
        return self.attempts > 1


class CoreLock:
    """An exclusive lock on a file shared by the bot processes of one machine (no-op without one).

    Two llama.cpp processes that each use every core slow each other down many times over (their
    threads spin on cores the other holds); holding this lock while generating, they take turns.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = None

    def __enter__(self) -> CoreLock:
        if self.path:
            if self._file is None:
                self._file = open(self.path, "a")  # noqa: SIM115 - held for the process's life
            fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)


class ChatModel(Protocol):
    """What a bot turn needs of a chat model, on either backend."""

    config: LLMConfig

    @property
    def model_name(self) -> str: ...

    @property
    def max_prompt_tokens(self) -> int: ...

    def count_tokens(self, messages: Sequence[BaseMessage]) -> int: ...

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
    ) -> Completion: ...


class ChatLLM:
    """A loaded chat model. Create one per process with :meth:`load`; it is safe to share."""

    def __init__(
        self,
        chat: BaseChatModel,
        client: Any,
        model: ModelFile,
        config: LLMConfig,
        prompt_format: Literal["chat_template", "llama2"],
    ) -> None:
        self._chat = chat
        self._client = client
        self._lock = threading.Lock()
        # llama.cpp derives each call's seed from the last one, so an unseeded process would replay
        # the same sequence on every start; fresh entropy per call avoids that
        self._seeds = random.Random()
        self.model = model
        self.config = config
        self.prompt_format = prompt_format
        self._formatter = _template_formatter(client) if prompt_format == "chat_template" else None
        from supportsim.bots.states import attach_state_cache, count_evaluated_tokens

        self.states = attach_state_cache(client, config.prompt_cache_mb)
        self._cores = CoreLock(config.core_lock)
        self._evaluated: list[int] = []
        self._grammars: dict[str, Any] = {}
        count_evaluated_tokens(client, self._evaluated)

    @classmethod
    def load(
        cls, config: LLMConfig | None = None, *, progress: AssemblyProgress | None = None
    ) -> ChatLLM:
        """Resolve the configured model to a GGUF file and load it (seconds; once per process)."""
        config = config or LLMConfig()
        if config.max_prompt_tokens < 64:
            raise ValueError(
                f"LLM_N_CTX={config.n_ctx} leaves {config.max_prompt_tokens} prompt tokens after "
                f"LLM_MAX_TOKENS={config.max_tokens}: raise LLM_N_CTX"
            )
        model = resolve_model(config.model, progress=progress)
        started = time.perf_counter()
        prompt_format = config.prompt_format
        if prompt_format == "auto" and LLAMA2_NAME.search(model.path.name):
            prompt_format = "llama2"
        if prompt_format == "llama2":
            chat, client = _llama2_chat(model.path, config)
        else:
            chat, client = _template_chat(model.path, config)
            if prompt_format == "auto" and _is_llama2_metadata(client.metadata):
                logger.info("%s has no chat template and is a Llama-2 model", model.path.name)
                del chat, client
                chat, client = _llama2_chat(model.path, config)
                prompt_format = "llama2"
        resolved: Literal["chat_template", "llama2"] = (
            "llama2" if prompt_format == "llama2" else "chat_template"
        )
        logger.info(
            "loaded %s (%s prompts, n_ctx=%d) in %.1f s",
            model.name,
            resolved,
            config.n_ctx,
            time.perf_counter() - started,
        )
        return cls(chat, client, model, config, resolved)

    @property
    def model_name(self) -> str:
        """The name reported in each chat message's `model` field."""
        return self.model.name

    @property
    def client(self) -> Any:
        """The underlying ``llama_cpp.Llama``."""
        return self._client

    @property
    def max_prompt_tokens(self) -> int:
        """How many prompt tokens a turn may use so the reply still fits the context."""
        return self.config.max_prompt_tokens

    def count_tokens(self, messages: Sequence[BaseMessage]) -> int:
        """Prompt tokens of `messages` as this model sees them (template and tokenizer included)."""
        if not messages:
            return 0
        try:
            prompt = self.prompt_text(messages)
        except Exception:  # some templates reject lists they cannot format (trimming slices)
            logger.debug("chat template could not render %d messages", len(messages))
            return self._approximate_tokens(messages)
        return self._token_count(prompt, add_bos=self._formatter is None)

    def prompt_text(self, messages: Sequence[BaseMessage]) -> str:
        """`messages` rendered as the model reads them (its chat template, or Llama-2 tags)."""
        if self._formatter is not None:
            return self._formatter(messages=[_message_dict(m) for m in messages]).prompt
        return _llama2_prompt(_llama2_messages(messages))

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
        """Generate the next line after `messages` (which must fit :attr:`max_prompt_tokens`).

        `stop` ends generation where the model starts writing the other side; `labels` are the
        speaker's own names, stripped when the model puts one in front of its line. Sampling
        overrides apply to this call only. `conversation` names whose saved llama.cpp state the
        prompt continues (see :mod:`supportsim.bots.states`), so only its new tokens are read.
        `schema` (a JSON schema) constrains the output with a llama.cpp grammar; the reply's
        text is then the raw JSON, for the caller to parse.
        """
        if seed is None and self.config.seed < 0:
            seed = self._seeds.randrange(2**31)
        overrides: dict[str, Any] = {
            name: value
            for name, value in (
                ("temperature", temperature),
                ("seed", seed),
                ("repeat_penalty", repeat_penalty),
            )
            if value is not None
        }
        stops = list(dict.fromkeys([*stop, *TEMPLATE_END_TOKENS]))
        if schema is not None:
            overrides["grammar"] = self._grammar(schema)
        if self.prompt_format == "llama2":
            messages = _llama2_messages(messages)
        with self._lock:
            if self.states is not None:
                self.states.conversation = conversation
            self._evaluated.clear()
            with self._cores:
                started = time.perf_counter()
                message = self._chat.invoke(list(messages), stop=stops, **overrides)
                latency_ms = round((time.perf_counter() - started) * 1000)
            # llama.cpp reads the prompt's unseen suffix in its first eval of a generation
            evaluated = self._evaluated[0] if self._evaluated else None
        raw = str(message.content)
        metadata = message.response_metadata or {}
        usage = metadata.get("token_usage") or {}
        # Llama2Chat goes through a plain LLM that drops llama.cpp's usage figures: count them
        prompt_tokens = usage.get("prompt_tokens") or self.count_tokens(messages)
        completion_tokens = usage.get("completion_tokens")
        if completion_tokens is None:
            completion_tokens = self._token_count(raw, add_bos=False)
        return Completion(
            text=raw.strip()
            if schema is not None
            else clean_reply(
                raw,
                labels,
                self.config.max_reply_chars,
                truncated=metadata.get("finish_reason") == "length",
            ),
            prompt_tokens=int(prompt_tokens),
            completion_tokens=int(completion_tokens),
            latency_ms=latency_ms,
            finish_reason=metadata.get("finish_reason"),
            raw_text=raw,
            evaluated_prompt_tokens=evaluated,
        )

    def _grammar(self, schema: dict[str, Any]) -> Any:
        """The llama.cpp grammar of a JSON schema (built once per schema)."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            from llama_cpp import LlamaGrammar

            self._grammars[key] = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        return self._grammars[key]

    def _token_count(self, text: str, *, add_bos: bool) -> int:
        if not text:
            return 0
        return len(self._client.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def _approximate_tokens(self, messages: Sequence[BaseMessage]) -> int:
        content = sum(self._token_count(str(m.content), add_bos=False) for m in messages)
        return content + APPROXIMATE_MESSAGE_OVERHEAD * (len(messages) + 1)


def clean_reply(
    text: str, labels: Sequence[str] = (), max_chars: int = 800, *, truncated: bool = False
) -> str:
    """A model's raw output made into one line of chat.

    Strips speaker labels at the start of lines ("Customer:", "**Sam (agent):**"), leaked
    end-of-turn tokens, markdown bold, a closing line in parentheses (a copied stage direction)
    or an opening parenthesis never closed,
    wrapping quotes and surrounding whitespace, and caps the length at a sentence end where
    possible. Text after a colon elsewhere is kept. `truncated` (generation hit its token limit)
    drops an unfinished last sentence.
    """
    names = sorted(
        {*(label.strip() for label in labels if label.strip()), *GENERIC_SPEAKER_LABELS}, key=len
    )
    label = re.compile(
        r"^[ \t*_\"'>#-]*(?:"
        + "|".join(re.escape(name) for name in reversed(names))
        + r")[ \t*_]*(?:\([^)\n]{0,40}\))?[ \t*_]*:[ \t*_]*",
        re.IGNORECASE | re.MULTILINE,
    )
    for token in TEMPLATE_END_TOKENS:
        text = text.replace(token, "\n")
    previous = None
    while previous != text:  # "Customer: Dana: hi" carries two labels
        previous, text = text, label.sub("", text)
    text = text.replace("**", "")
    # a last line (or a whole reply) all in parentheses is a copied stage direction, not speech
    text = re.sub(r"(?:^|\n)[ \t]*\([^()\n]*\)[ \t]*$", "", text.strip())
    # an opening parenthesis never closed: the model began a stage direction, then spoke
    if text.startswith("(") and ")" not in text:
        text = text[1:]
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and text.count(text[0]) == 2:
        text = text[1:-1].strip()
    if truncated:
        text = _without_unfinished_sentence(text)
    return _capped(text, max_chars)


def _without_unfinished_sentence(text: str) -> str:
    # a list cut off right after its next item number ("...\n\n3.") ends on that number
    text = re.sub(r"\n+\s*(?:\d+[.)]|[-*\u2022])\s*$", "", text).rstrip()
    if text.endswith((".", "!", "?", "\u2026", ")", '"')):
        return text
    end = max(text.rfind(mark) for mark in (". ", "! ", "? ", ".\n", "!\n", "?\n"))
    # keep a cut-off text whole rather than reduce it to a stub
    return text[: end + 1] if end >= len(text) // 3 else text.rstrip() + "\u2026"


def _capped(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    sentence_end = max(head.rfind(mark) for mark in (". ", "! ", "? ", ".\n", "!\n", "?\n"))
    if sentence_end >= max_chars // 2:
        return head[: sentence_end + 1]
    space = head.rfind(" ")
    return (head[:space] if space > 0 else head[: max_chars - 1]).rstrip() + "\u2026"


def _message_dict(message: BaseMessage) -> dict[str, str]:
    if isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, AIMessage):
        role = "assistant"
    else:
        role = "user"
    return {"role": role, "content": str(message.content)}


def _llama2_messages(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """`messages` as Llama2Chat accepts them: a later system message joins the message before."""
    folded: list[BaseMessage] = []
    for message in messages:
        if folded and isinstance(message, SystemMessage):
            previous = folded[-1]
            if isinstance(previous, HumanMessage):
                folded[-1] = HumanMessage(content=f"{previous.content}\n\n{message.content}")
            else:
                folded.append(HumanMessage(content=str(message.content)))
        else:
            folded.append(message)
    return folded


def _llama2_prompt(messages: Sequence[BaseMessage]) -> str:
    """The Llama-2 prompt of `messages`, tagged like Llama2Chat tags them (order not checked)."""
    from langchain_experimental.chat_models import Llama2Chat

    tags = Llama2Chat.model_fields
    parts = []
    for message in messages:
        if isinstance(message, SystemMessage):
            begin, end = tags["sys_beg"].default, tags["sys_end"].default
        elif isinstance(message, AIMessage):
            begin, end = tags["ai_n_beg"].default, tags["ai_n_end"].default
        else:
            begin, end = tags["usr_n_beg"].default, tags["usr_n_end"].default
        parts.append(f"{begin}{message.content}{end}")
    return "".join(parts)


def _template_formatter(client: Any) -> Any | None:
    """A renderer of the GGUF's chat template, the same one llama.cpp formats prompts with."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = client.metadata.get("tokenizer.chat_template")
    if not template:
        return None

    def token_text(token_id: int) -> str:
        if token_id < 0:
            return ""
        return client.detokenize([token_id], special=True).decode("utf-8", errors="ignore")

    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(client.token_eos()),
        bos_token=token_text(client.token_bos()),
        stop_token_ids=[client.token_eos()],
    )


def _is_llama2_metadata(metadata: dict[str, str]) -> bool:
    if "tokenizer.chat_template" in metadata:
        return False
    name = f"{metadata.get('general.name', '')} {metadata.get('general.basename', '')}"
    return bool(LLAMA2_NAME.search(name))


def _sampling(config: LLMConfig) -> dict[str, Any]:
    return {
        "n_ctx": config.n_ctx,
        "n_threads": config.n_threads,
        "n_batch": config.n_batch,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "repeat_penalty": config.repeat_penalty,
        "seed": config.seed,
        "streaming": False,  # the non-streaming path keeps llama.cpp's token usage
        "verbose": False,
    }


def _template_chat(path: Path, config: LLMConfig) -> tuple[BaseChatModel, Any]:
    with warnings.catch_warnings():
        # langchain-community warns on import that it is being sunset; it still is the
        # maintained home of ChatLlamaCpp for LangChain 1.x
        warnings.simplefilter("ignore", DeprecationWarning)
        from langchain_community.chat_models import ChatLlamaCpp
    chat = ChatLlamaCpp(model_path=str(path), **_sampling(config))
    if "tokenizer.chat_template" in chat.client.metadata:
        # llama.cpp would swap a template it recognises for a built-in look-alike; keep the file's
        chat.client.chat_format = "chat_template.default"
    else:
        logger.warning(
            "%s carries no chat template; llama.cpp falls back to its %s format",
            path.name,
            chat.client.chat_format,
        )
    return chat, chat.client


def _llama2_chat(path: Path, config: LLMConfig) -> tuple[BaseChatModel, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from langchain_community.llms import LlamaCpp
        from langchain_experimental.chat_models import Llama2Chat
    llm = LlamaCpp(model_path=str(path), **_sampling(config))
    return Llama2Chat(llm=llm), llm.client
