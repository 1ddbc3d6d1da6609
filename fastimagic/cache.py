"""A bounded, least-recently-used, thread-safe cache that loads each key once.

A long-lived GPU worker keeps base models (bounded by count) and tunings (bounded by bytes) across many renders and
storyboards; both use :class:`LruCache`. Two threads asking for the same missing key share one load; threads asking
for different keys load at the same time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LruCache(Generic[V]):
    """At most ``capacity`` units of values, least recently used out first.

    ``size(value)`` is a value's units (default 1: a count). A value bigger than the capacity is returned but not
    kept. ``loads`` counts loads per key, so a worker can say how often it paid for one.
    """

    def __init__(self, capacity: int, size: Callable[[V], int] = lambda _: 1):
        self.capacity = capacity
        self._size = size
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}
        self.loads: dict[Hashable, int] = {}

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def used(self) -> int:
        """Units held now."""
        with self._lock:
            return sum(units for _, units in self._items.values())

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        """The value for ``key``, from the cache or from ``load()`` (called once however many threads ask)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one loader per key; the others wait for it and then find the value
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key][0]
            try:
                value = load()
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            self.loads[key] = self.loads.get(key, 0) + 1
            self.put(key, value)
            return value

    def put(self, key: Hashable, value: V) -> None:
        """Keep ``value`` (replacing any under ``key``), dropping least recently used values to make room."""
        units = self._size(value)
        with self._lock:
            self._items.pop(key, None)
            if units > self.capacity:
                return
            while self._items and sum(u for _, u in self._items.values()) + units > self.capacity:
                self._items.popitem(last=False)
            self._items[key] = (value, units)

    def values(self) -> list[V]:
        with self._lock:
            return [value for value, _ in self._items.values()]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
