"""The prompt cache's rows on the GPU, for the device pipelines (engine/device_pipeline.py).

Each cached text-encoder output (the hidden states the UNet reads; SDXL's pooled projection too) has a pool of
``capacity`` rows in device memory, allocated once; a cache entry's slot (engine/prompt_cache.py) is its row in
every pool. A request that misses runs the whole chain and then copies its rows into their slots; a request
that hits copies its rows from their slots into the UNet's input buffers and replays a graph captured
without the text encoders. Every copy is device to device on the pipeline's stream, so a request still
waits on the host only for its pixels.
"""

from __future__ import annotations

import numpy as np

from .prompt_cache import PromptCache

CACHED = {"hidden": "cache_hidden", "pooled": "cache_pooled"}  # the UNet's input buffer -> its pool


class DevicePromptRows:
    """The pools of one pipeline: ``buffers`` holds the per-request buffers' (shape [B, ...], dtype) by name."""

    def __init__(self, cache: PromptCache, cuda, buffers: dict[str, tuple]):
        self.cache = cache
        self.row_bytes = {}
        self.pools = {}
        for name in CACHED:
            if name in buffers:
                shape, dtype = buffers[name]
                self.row_bytes[name] = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
                self.pools[name] = cuda.DeviceBuffer(cache.capacity * self.row_bytes[name])

    def free(self) -> None:
        for pool in self.pools.values():
            pool.free()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The buffers a hit fills from the pools: the hit graph's inputs (not to be poisoned before a replay)."""
        return tuple(self.pools)

    def load(self, stream, dev: dict, slots: list[int]) -> None:
        """Row i of each input buffer <- slot ``slots[i]`` of its pool."""
        for name, pool in self.pools.items():
            n = self.row_bytes[name]
            for i, slot in enumerate(slots):
                stream.copy_d2d(dev[name].ptr + i * n, pool.ptr + slot * n, n)

    def store(self, stream, dev: dict, keys: list[tuple]) -> None:
        """Each row of the input buffers -> the slot its key gets in the cache (evicting the least recent)."""
        for i, key in enumerate(keys):
            slot = self.cache.store(key)
            for name, pool in self.pools.items():
                n = self.row_bytes[name]
                stream.copy_d2d(pool.ptr + slot * n, dev[name].ptr + i * n, n)
