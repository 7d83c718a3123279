"""Paged KV cache: page layouts per dtype (`layout`), the cache pytree and its writes (`paged`),
and the host-side page allocator."""

from kvjax.cache.allocator import OutOfPages, PageAllocator
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

__all__ = ["NULL_PAGE", "KVCache", "OutOfPages", "PageAllocator", "PoolSpec", "Segment",
           "bytes_per_token", "init_cache", "slot_mapping", "window_bytes_per_sequence",
           "write_layer"]
