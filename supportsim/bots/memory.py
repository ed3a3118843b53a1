"""Token-bounded conversation memory: plain history in, the chat messages for one turn out.

History is what the conversation state stores: a list of plain dicts with a ``role``
(``"customer"`` or ``"agent"``) and a ``text``. A bot sees it from its own side: its own lines
are AI messages, the other side's lines are human messages, after one system message. The most
recent lines that fit the token budget are kept (LangChain's ``trim_messages``, the successor of
``ConversationTokenBufferMemory``), so a conversation never overflows the model's context.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    trim_messages,
)

from supportsim.contract.messages import Role

TokenCounter = Callable[[list[BaseMessage]], int]
"""Counts the prompt tokens of a list of messages (the model's own tokenizer in production)."""


class ContextBudgetError(ValueError):
    """The system prompt alone does not fit the token budget: n_ctx is too small for the prompt."""


def chat_messages(
    system_prompt: str,
    history: Sequence[Mapping[str, Any]],
    role: Role,
    *,
    opening_cue: str | None = None,
) -> list[BaseMessage]:
    """The whole conversation as chat messages from `role`'s point of view.

    Consecutive lines of one side are joined into one message, so human and AI messages
    alternate (Llama-2 prompts require it). When the bot speaks first (no history, or the history
    opens with its own line), `opening_cue` becomes the first human message.
    """
    messages: list[BaseMessage] = [SystemMessage(content=system_prompt)]
    if opening_cue and (not history or history[0]["role"] == role):
        messages.append(HumanMessage(content=opening_cue))
    for line in history:
        own = line["role"] == role
        # a bot sees its own structured lines as it wrote them, so its saved prompt stays a prefix
        text = str((own and line.get("raw")) or line["text"]).strip()
        if not text:
            continue
        kind = AIMessage if own else HumanMessage
        if isinstance(messages[-1], kind):
            messages[-1] = kind(content=f"{messages[-1].content}\n\n{text}")
        else:
            messages.append(kind(content=text))
    return messages


def bounded_messages(
    system_prompt: str,
    history: Sequence[Mapping[str, Any]],
    role: Role,
    *,
    token_counter: TokenCounter,
    max_tokens: int,
    opening_cue: str | None = None,
    reminder: str | None = None,
) -> list[BaseMessage]:
    """The system prompt plus the most recent history that fits in `max_tokens` prompt tokens.

    The kept history starts with a human message. When even the newest message alone does not
    fit, its most recent part is kept. `reminder` becomes a last system message after the
    message being answered (only when the history ends with the other side). Raises
    :class:`ContextBudgetError` when the system prompt and reminder alone do not fit.
    """
    messages = chat_messages(system_prompt, history, role, opening_cue=opening_cue)
    system = messages[0]
    tail: list[BaseMessage] = []
    if reminder and isinstance(messages[-1], HumanMessage):
        tail = [SystemMessage(content=reminder)]
    fixed = token_counter([system, *tail])
    if fixed > max_tokens:
        raise ContextBudgetError(
            f"the system prompt alone takes {fixed} tokens, more than the budget of "
            f"{max_tokens}: raise LLM_N_CTX or lower LLM_MAX_TOKENS"
        )
    if len(messages) == 1:
        return messages
    kept = trim_messages(
        messages,
        max_tokens=max_tokens - (fixed - token_counter([system])),
        token_counter=token_counter,
        strategy="last",
        include_system=True,
        start_on="human",
        allow_partial=False,
    )
    # trim_messages counts the system prompt and the rest apart; a counter that is not exactly
    # additive (a chat template's framing) may still be over, so drop the oldest until it fits
    while len(kept) > 2 and token_counter([*kept, *tail]) > max_tokens:
        kept = [system, *_from_first_human(kept[2:])]
    if len(kept) > 1 and token_counter([*kept, *tail]) <= max_tokens:
        return [*kept, *tail]
    newest = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), messages[-1])
    return [system, _shortened(newest, system, tail, token_counter, max_tokens), *tail]


def _from_first_human(messages: list[BaseMessage]) -> list[BaseMessage]:
    for index, message in enumerate(messages):
        if isinstance(message, HumanMessage):
            return messages[index:]
    return []


def _shortened(
    message: BaseMessage,
    system: BaseMessage,
    tail: list[BaseMessage],
    token_counter: TokenCounter,
    max_tokens: int,
) -> BaseMessage:
    """`message` cut to its longest ending that fits beside the system prompt (binary search)."""
    text = str(message.content)

    def ending(length: int) -> BaseMessage:
        return type(message)(content="..." + text[len(text) - length :])

    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if token_counter([system, ending(middle), *tail]) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return ending(low)
