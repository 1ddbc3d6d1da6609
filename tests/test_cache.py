"""The bounded LRU cache workers keep base models (by count) and tunings (by bytes) in."""

from __future__ import annotations

import threading

from fastimagic.cache import LruCache


def test_least_recently_used_goes_first_when_the_bytes_run_out():
    cache = LruCache(10, size=len)
    cache.get("a", lambda: b"aaaa")
    cache.get("b", lambda: b"bbbb")
    cache.get("a", lambda: b"never")  # a is now the most recently used
    cache.get("c", lambda: b"cccc")  # 12 bytes > 10: b goes
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.used == 8
    assert cache.loads == {"a": 1, "b": 1, "c": 1}


def test_a_value_bigger_than_the_cache_is_returned_but_not_kept():
    cache = LruCache(3, size=len)
    assert cache.get("big", lambda: b"xxxx") == b"xxxx"
    assert "big" not in cache and len(cache) == 0


def test_a_count_bound_keeps_that_many():
    cache = LruCache(1)
    cache.get("sd15", lambda: 1)
    cache.get("sdxl", lambda: 2)
    assert cache.values() == [2]


def test_two_threads_asking_for_the_same_key_load_it_once_and_other_keys_do_not_wait():
    cache = LruCache(100)
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(60)  # k's load lasts until the other key has been loaded (proved without a clock)
        return "tuning"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    assert started.wait(30)
    other = threading.Thread(target=lambda: results.append(cache.get("other", lambda: "fast")))
    other.start()
    other.join(30)  # not stuck behind k's load, which cannot end before this
    assert not other.is_alive() and results == ["fast"]
    release.set()
    for t in threads:
        t.join()
    assert results == ["fast"] + ["tuning"] * 4 and cache.loads["k"] == 1


def test_a_failed_load_is_not_cached_and_the_next_ask_loads_again():
    cache = LruCache(5)

    def boom():
        raise OSError("unreachable")

    try:
        cache.get("k", boom)
    except OSError:
        pass
    assert cache.get("k", lambda: "ok") == "ok"
