"""Paged KV cache: page layouts per dtype (`layout`), the cache pytree and its writes (`paged`),
and the host-side page allocator
(`block_manager`: reference-counted pages, the prefix cache)."""

from kvjax.cache.block_manager import BlockManager, OutOfPages
from kvjax.cache.layout import PoolSpec
from kvjax.cache.paged import (
    NULL_PAGE,
    KVCache,
    Segment,
    bytes_per_token,
    init_cache,
    slot_mapping,
    window_bytes_per_sequence,
    write_layer,
)

__all__ = ["NULL_PAGE", "BlockManager", "KVCache", "OutOfPages", "PoolSpec", "Segment",
           "bytes_per_token", "init_cache", "slot_mapping", "window_bytes_per_sequence",
           "write_layer"]
