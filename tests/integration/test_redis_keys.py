"""Clearing a prefix in a real Redis: the one helper every reset goes through."""

import pytest

from supportsim.contract.redis_keys import DELETE_CHUNK, RedisKeys, clear_prefix, keys_under


def test_clearing_a_prefix_deletes_its_keys_and_nothing_else(redis_client, prefix):
    keys = RedisKeys(prefix)
    neighbour = f"{prefix[:-1]}x-fleet"  # shares the characters but not the prefix
    many = [keys.conversation(str(i)) for i in range(DELETE_CHUNK + 7)]  # more than one DEL
    redis_client.mset({name: "{}" for name in [*many, keys.fleet, neighbour]})
    try:
        assert len(keys_under(redis_client, prefix, "conversation:*")) == len(many)
        assert clear_prefix(redis_client, prefix) == len(many) + 1
        assert keys_under(redis_client, prefix) == []
        assert redis_client.get(neighbour) == "{}"
    finally:
        redis_client.delete(neighbour)


def test_an_empty_prefix_is_refused_instead_of_emptying_the_database(redis_client):
    with pytest.raises(ValueError, match="empty prefix"):
        clear_prefix(redis_client, "")
