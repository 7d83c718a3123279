"""Host-side page allocator: a free list over the page pool, page 0 reserved as the null page.

Sequences get pages on demand as they grow and give them all back when they finish. The device
never sees this object: it only sees the page table rows built from it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvjax.cache.paged import NULL_PAGE


class OutOfPages(RuntimeError):
    """The pool has no free page left for a sequence that needs one."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (page 0 is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Pop from the end: low page ids are handed out first, which keeps dumps readable.
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))
        self._pages: dict[int, list[int]] = {}  # sequence id -> its pages, in token order

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def pages(self, seq_id: int) -> list[int]:
        return self._pages.get(seq_id, [])

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id` to hold `num_tokens` tokens; raises OutOfPages (allocating nothing)."""
        pages = self._pages.setdefault(seq_id, [])
        missing = self.pages_needed(num_tokens) - len(pages)
        if missing > len(self._free):
            raise OutOfPages(f"sequence {seq_id} needs {missing} more pages, {self.num_free} free")
        for _ in range(max(missing, 0)):
            pages.append(self._free.pop())
        return pages

    def free(self, seq_id: int) -> None:
        """Return every page of `seq_id` to the free list."""
        self._free.extend(reversed(self._pages.pop(seq_id, [])))

    def page_table(self, seq_ids: list[int], max_pages: int) -> np.ndarray:
        """[len(seq_ids), max_pages] int32; unowned entries point at the null page."""
        return page_table(self.pages, seq_ids, max_pages)


def page_table(pages_of: Callable[[int], list[int]], seq_ids: list[int],
               max_pages: int) -> np.ndarray:
    """[len(seq_ids), max_pages] int32 rows of each sequence's pages (`pages_of(seq_id)`), padded
    with the null page. Shared by the runner's allocator and the engine's block manager."""
    table = np.full((len(seq_ids), max_pages), NULL_PAGE, np.int32)
    for row, sid in enumerate(seq_ids):
        pages = pages_of(sid)
        if len(pages) > max_pages:
            raise ValueError(f"sequence {sid} has {len(pages)} pages > max_pages {max_pages}")
        table[row, : len(pages)] = pages
    return table
