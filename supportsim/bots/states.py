"""Prompt reuse for the in-process model: each conversation's llama.cpp state kept in RAM.

A turn then evaluates only the tokens added since that conversation's previous turn in this
process, however many conversations the process interleaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_cpp.llama_cache import LlamaRAMCache


class ConversationStates(LlamaRAMCache):
    """llama.cpp states in RAM, one per conversation, the least recently used evicted first.

    llama-cpp-python asks its cache for the state of each prompt before generating (and loads it
    when it holds more of the prompt than the live context) and stores the state after. Set
    :attr:`conversation` before each call: a lookup returns only that conversation's state and
    a store replaces it, so a process interleaving many conversations reads each prompt once.
    """

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self.conversation = ""
        self._keys: dict[str, tuple[int, ...]] = {}
        self._owners: dict[tuple[int, ...], str] = {}
        self._bytes = 0

    @property
    def cache_size(self) -> int:
        """Bytes held by the saved states."""
        return self._bytes

    # no __len__: llama-cpp-python tests `if self.cache`, and an empty cache must still be used
    @property
    def conversations(self) -> int:
        """How many conversations have a saved state."""
        return len(self._keys)

    def __contains__(self, key: Sequence[int]) -> bool:
        return self.conversation in self._keys

    def __getitem__(self, key: Sequence[int]) -> Any:
        own = self._keys.get(self.conversation)
        if own is None:
            raise KeyError(self.conversation)
        self.cache_state.move_to_end(own)
        return self.cache_state[own]

    def __setitem__(self, key: Sequence[int], value: Any) -> None:
        self._drop(self.conversation)
        if value.llama_state_size > self.capacity_bytes:
            return
        key = tuple(key)
        self._drop(self._owners.get(key))  # another conversation ending in the same tokens
        self.cache_state[key] = value
        self._keys[self.conversation] = key
        self._owners[key] = self.conversation
        self._bytes += value.llama_state_size
        while self._bytes > self.capacity_bytes:
            self._drop(self._owners[next(iter(self.cache_state))])

    def _drop(self, conversation: str | None) -> None:
        key = self._keys.pop(conversation, None) if conversation is not None else None
        if key is not None:
            self._bytes -= self.cache_state.pop(key).llama_state_size
            del self._owners[key]


def attach_state_cache(client: Any, megabytes: int) -> ConversationStates | None:
    """Give a llama.cpp model a state cache of `megabytes` (None and no cache when 0)."""
    if megabytes <= 0:
        return None
    # without logits_all llama.cpp never reads its logits copy, yet every saved state copies it
    # (context rows x vocabulary floats): one row keeps the states to the KV cache
    client.scores = client.scores[:1].copy()
    states = ConversationStates(megabytes * 1024 * 1024)
    client.set_cache(states)
    return states


def count_evaluated_tokens(client: Any, counts: list[int]) -> None:
    """Record the length of each of the model's eval calls in `counts`."""
    evaluate = client.eval

    def counted(tokens: Sequence[int]) -> None:
        counts.append(len(tokens))
        evaluate(tokens)

    client.eval = counted
