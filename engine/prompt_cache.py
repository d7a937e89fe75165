"""The text encoders' outputs for recent prompts, so that a repeated prompt skips them.

One entry per prompt (a row of a batch), keyed by the text encoders' identity, the batch size they ran at
and the prompt's token ids (every tokenizer's). A request is a hit when every one of its prompts is in the
cache: then no text encoder runs and the rows are put together from the cache. Otherwise the encoders run on
the whole batch, exactly as without a cache, and each row is stored. The images are the same bit for bit
either way, because an encoder's output for one prompt does not depend on the other prompts of its batch
(each row's arithmetic is the same whatever the others hold) and is only ever reused at the batch size it
was computed at: tests/engine/test_prompt_cache.py checks it, shuffled batches included.

Least recently used entries go first. Each entry owns a slot number below the capacity for as long as it
lives, so a device pipeline can keep its rows in a device pool of ``capacity`` rows (a slot is reused only by
the entry that evicts its owner).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

DEFAULT_SIZE = 64  # prompts; SD-Turbo's hidden states are 77 x 1024 floats each (315 kB in fp32)


@dataclass
class Entry:
    slot: int
    value: Any  # the host pipeline's rows, or None where the rows live in a device pool at ``slot``


class PromptCache:
    """An LRU of per-prompt text-encoder outputs; ``capacity`` 0 turns it off. Safe to share between threads."""

    def __init__(self, capacity: int = DEFAULT_SIZE):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise InputError(f"prompt_cache={capacity!r} is not allowed; give a number of prompts >= 0 (0: off)")
        self.capacity = int(capacity)
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0  # requests served from the cache, requests not; entries dropped

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @staticmethod
    def keys(encoder: tuple, ids: list[np.ndarray]) -> list[tuple]:
        """One key per prompt: (encoder identity, batch size, the row's token ids from every tokenizer)."""
        batch = ids[0].shape[0]
        return [(encoder, batch, b"".join(np.ascontiguousarray(t[i]).tobytes() for t in ids)) for i in range(batch)]

    def lookup(self, keys: list[tuple]) -> list[Entry] | None:
        """Every key's entry (each now the most recent), or None, a miss, when any is absent or the cache is off."""
        if not self.enabled:
            return None
        with self._lock:
            if not all(k in self._entries for k in keys):
                self.misses += 1
                return None
            for k in keys:
                self._entries.move_to_end(k)
            self.hits += 1
            return [self._entries[k] for k in keys]

    def store(self, key: tuple, value: Any = None) -> int | None:
        """Keep ``value`` under ``key`` as the most recent entry, evicting the least recent one when full; the
        entry's slot (None when the cache is off)."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.value = value
                self._entries.move_to_end(key)
                return entry.slot
            if len(self._entries) < self.capacity:
                slot = len(self._entries)
            else:
                _, old = self._entries.popitem(last=False)
                self.evictions += 1
                slot = old.slot
            self._entries[key] = Entry(slot, value)
            return slot

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "size": len(self),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


def as_prompt_cache(prompt_cache: int | PromptCache) -> PromptCache:
    """``prompt_cache`` as the Python API takes it: a size (0: off) or a cache to share between pipelines."""
    return prompt_cache if isinstance(prompt_cache, PromptCache) else PromptCache(prompt_cache)
