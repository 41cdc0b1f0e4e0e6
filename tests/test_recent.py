"""`Recent`, the bounded least-recently-used map behind the coordinator's and the agent's per-job caches."""

from __future__ import annotations

import pytest

from fedmeki_core.recent import Recent


def test_the_least_recently_used_entry_is_forgotten_first() -> None:
    recent: Recent[str, int] = Recent(limit=2)
    recent.put("a", 1)
    recent.put("b", 2)
    assert recent.get("a") == 1  # now the most recent
    recent.put("c", 3)
    assert list(recent) == ["a", "c"] and "b" not in recent
    recent.put("a", 4)  # set again: the most recent, with its new value
    recent.put("d", 5)
    assert list(recent) == ["a", "d"] and recent.get("a") == 4
    assert recent.get("zzz") is None and len(recent) == 2


def test_entries_can_be_dropped_while_iterating() -> None:
    recent: Recent[str, int] = Recent(limit=8)
    for index, key in enumerate("abcd"):
        recent.put(key, index)
    for key in recent:
        if recent.get(key) in (1, 3):
            recent.pop(key)
    recent.pop("never-there")
    assert list(recent) == ["a", "c"]


def test_a_map_that_keeps_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Recent(limit=0)
