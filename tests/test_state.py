"""The process's caches and locks (`adaptflow.state`): bounds, versions and one lock per device."""

import threading

import pytest

from adaptflow import state
from adaptflow.state import DeviceLocks, LRUCache


def test_a_cache_bounded_by_count_forgets_the_least_recently_used():
    cache = LRUCache(max_items=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.values() == [1, 3] and len(cache) == 2
    cache.put("a", 10)  # a put replaces, and counts as a use
    cache.put("d", 4)
    assert cache.values() == [10, 4]
    cache.clear()
    assert len(cache) == 0 and cache.get("a") is None


def test_a_cache_bounded_by_size_makes_room_and_keeps_the_newest():
    cache = LRUCache(max_size=10, size=len)
    cache.put("a", "x" * 4)
    cache.put("b", "x" * 4)
    cache.put("c", "x" * 4)  # 12 > 10: "a" goes
    assert cache.values() == ["x" * 4] * 2 and cache.get("a") is None
    assert cache.get("b") is not None  # "c" is now the least recently used
    cache.put("d", "x" * 6)
    assert cache.get("c") is None and [len(v) for v in cache.values()] == [4, 6]
    cache.max_size = 5  # a smaller bound applies at the next put
    cache.put("e", "x" * 5)
    assert cache.values() == ["x" * 5]
    with pytest.raises(ValueError, match="go together"):
        LRUCache(max_size=10)


def test_a_new_version_replaces_its_stale_copy():
    """A sample read again from other shards: the old copy answers no more, and is not kept beside it."""
    cache = LRUCache(max_items=4)
    cache.put("sample", "old rows", version=("shard-1",))
    assert cache.get("sample", ("shard-1",)) == "old rows"
    assert cache.get("sample", ("shard-1", "shard-2")) is None and cache.get("sample") is None
    cache.put("sample", "new rows", version=("shard-1", "shard-2"))
    assert cache.values() == ["new rows"] and cache.get("sample", ("shard-1",)) is None
    assert cache.get("sample", ("shard-1", "shard-2")) == "new rows"


def test_a_cache_is_safe_across_threads():
    cache = LRUCache(max_items=8)

    def work(k):
        for i in range(500):
            cache.put((k, i % 16), i)
            cache.get((k, (i + 3) % 16))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 8


def test_one_lock_per_device():
    locks = DeviceLocks()
    assert locks.lock("cuda:0") is locks.lock("cuda:0") is locks.lock(_Device("cuda:0"))
    assert locks.lock("cuda:1") is not locks.lock("cuda:0")


def test_the_process_caches_keep_their_bounds():
    assert state.LOCATIONS.max_items == 2
    assert state.SAMPLES.max_size == 1 << 30 and state.SAMPLES.size is not None


class _Device:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name
