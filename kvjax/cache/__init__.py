"""Paged KV cache: device-side page pools (`paged`) and the host-side page allocator."""

from kvjax.cache.allocator import OutOfPages, PageAllocator
from kvjax.cache.paged import (
    NULL_PAGE,
    KVCache,
    bytes_per_token,
    init_cache,
    slot_mapping,
    write_layer,
)

__all__ = ["NULL_PAGE", "KVCache", "OutOfPages", "PageAllocator", "bytes_per_token", "init_cache",
           "slot_mapping", "write_layer"]
