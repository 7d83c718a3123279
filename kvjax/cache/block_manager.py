"""Reference-counted pages and the prefix cache: the one page allocator, for the engine and for
the Runner (generate, eval: prefix caching off, where it is a plain free list).

The device cache is an opaque pytree; what the engine manages are page ids. Every page except the
null page 0 is in exactly one of three states:

- owned: referenced by one or more sequences' block tables (`refcount > 0`);
- cached: unreferenced but holding a full page whose contents are known by its hash, kept in an LRU
  queue so a later request with the same prefix can take it back;
- free: unreferenced and holding nothing anyone can find.

Allocation takes free pages first, then evicts the least recently released cached page (dropping
its hash). Releasing a sequence walks its pages in reverse, so a finished request's tail pages are
evicted before its head pages: heads are the ones most likely to be shared (vLLM does the same).

Prefix hashes are chained over full pages: `h_i = sha256(h_{i-1} || token ids of page i)`, with the
root `h_{-1} = sha256(cache dtype || page size || cache_salt)`. Putting the cache dtype in the root
means a page written in one layout (bf16, fp8, KIVI codes + scales, ...) is never found by a request
served from another layout; the salt isolates tenants. A hit hands out the *page id*; quantization
metadata (scales, zero points, norms) lives in side arrays indexed by page id, so it travels with
the page and a hit never decodes with another page's scales. Only full pages whose tokens have been
written by a completed forward are registered (`commit`), and a hit never covers a sequence's last
prompt token, so shared pages are never written again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from kvjax.cache.paged import NULL_PAGE


class OutOfPages(RuntimeError):
    """No free or evictable page is left."""


def root_hash(cache_dtype: str, page_size: int, salt: str | None = None) -> bytes:
    h = hashlib.sha256(b"kvjax-prefix-v1\0")
    h.update(f"{cache_dtype}\0{page_size}\0".encode())
    if salt:
        h.update(b"salt\0" + salt.encode())
    return h.digest()


def chain_hashes(tokens: list[int], page_size: int, root: bytes, start: int = 0,
                 parent: bytes | None = None) -> list[bytes]:
    """Hashes of the full pages of `tokens` from page `start` on (`parent` = hash of page start-1,
    or the root when start is 0)."""
    out = []
    parent = root if start == 0 else parent
    for i in range(start, len(tokens) // page_size):
        page = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
        parent = hashlib.sha256(parent + page).digest()
        out.append(parent)
    return out


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, cache_dtype: str = "bf16",
                 enable_prefix_caching: bool = False, recompute_tail: int = 1):
        """recompute_tail: a prefix hit never covers a prompt's last `recompute_tail` tokens (at
        least its last token, whose logits must be computed; a windowed layout passes its window,
        so prefill refills the sequence's full-precision ring)."""
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (page 0 is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.cache_dtype = cache_dtype
        self.enable_prefix_caching = enable_prefix_caching
        self.recompute_tail = max(1, recompute_tail)
        self.refcount = np.zeros(num_pages, np.int32)
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # pop() hands out low ids first
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced pages with a hash, LRU
        self._hash_to_page: dict[bytes, int] = {}
        self._page_hash: dict[int, bytes] = {}
        self.tables: dict[int, list[int]] = {}  # sequence id -> pages in token order
        self._committed: dict[int, int] = {}  # sequence id -> leading pages already hashed
        self._last_hash: dict[int, bytes] = {}  # sequence id -> hash of its last committed page
        # Eviction: tokens dropped so far and the absolute position of each kept page's first
        # token (pages past the list continue the tail: index * page_size + evicted).
        self._evicted: dict[int, int] = {}
        self._page_pos: dict[int, list[int]] = {}
        # Token-granular eviction: the absolute position of each kept token (cache order);
        # tokens past the array continue the tail (cache position + evicted).
        self._tok_pos: dict[int, np.ndarray] = {}
        # Counters (tokens, like vLLM's prefix_cache_queries / prefix_cache_hits).
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- capacity ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages an allocation can take now: free plus cached-but-unreferenced."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        """Pages referenced by at least one sequence."""
        return self.num_pages - 1 - self.num_free

    def usage(self) -> float:
        return self.num_used / (self.num_pages - 1)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def pages(self, seq_id: int) -> list[int]:
        return self.tables.get(seq_id, [])

    # ---- allocation ----------------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        elif self._cached:
            page, _ = self._cached.popitem(last=False)  # least recently released
            del self._hash_to_page[self._page_hash.pop(page)]
        else:
            raise OutOfPages("no free page")
        self.refcount[page] = 1
        return page

    def _ref(self, page: int) -> None:
        if self.refcount[page] == 0:
            self._cached.pop(page)
        self.refcount[page] += 1

    def _unref(self, page: int) -> None:
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            if page in self._page_hash:
                self._cached[page] = None
            else:
                self._free.append(page)

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id` to hold `num_tokens` tokens; OutOfPages (allocating nothing) if not."""
        table = self.tables.setdefault(seq_id, [])
        missing = self.pages_needed(num_tokens) - len(table)
        if missing > self.num_free:
            raise OutOfPages(f"sequence {seq_id} needs {missing} more pages, {self.num_free} free")
        for _ in range(max(missing, 0)):
            table.append(self._take())
        return table

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.pages_needed(num_tokens) - len(self.pages(seq_id)) <= self.num_free

    def free(self, seq_id: int) -> None:
        """Drop every reference `seq_id` holds (tail first, so tails are evicted first)."""
        for page in reversed(self.tables.pop(seq_id, [])):
            self._unref(page)
        self._committed.pop(seq_id, None)
        self._last_hash.pop(seq_id, None)
        self._evicted.pop(seq_id, None)
        self._page_pos.pop(seq_id, None)
        self._tok_pos.pop(seq_id, None)

    def fork(self, parent: int, child: int, num_tokens: int) -> None:
        """`child` shares the full pages of `parent`'s first `num_tokens` tokens by reference."""
        if child in self.tables:
            raise ValueError(f"sequence {child} already has pages")
        shared = self.pages(parent)[: num_tokens // self.page_size]
        for page in shared:
            self._ref(page)
        self.tables[child] = list(shared)
        n = min(len(shared), max(self._committed.get(parent, 0), 0))
        if n:
            self._committed[child] = n
            # The hash of page n-1 of the parent is the hash the child continues from.
            self._last_hash[child] = self._page_hash.get(shared[n - 1], b"")
            if not self._last_hash[child]:
                self._committed.pop(child)
                self._last_hash.pop(child)

    def drop_pages(self, seq_id: int, indices: list[int]) -> list[int]:
        """Remove the pages at these table indices (eviction); returns the page ids released.
        The sequence stops registering prefix pages: its later pages depend on dropped tokens."""
        table = self.tables[seq_id]
        drop = sorted(set(indices), reverse=True)
        released = [table[i] for i in drop]
        pos = self._positions(seq_id, len(table))
        for i in drop:
            del table[i]
            del pos[i]
        self._page_pos[seq_id] = pos
        self._evicted[seq_id] = self._evicted.get(seq_id, 0) + len(drop) * self.page_size
        for page in released:
            self._unref(page)
        self._committed[seq_id] = -1  # never commit again
        return released

    def drop_tokens(self, seq_id: int, positions: list[int], num_tokens: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Token-granular eviction of the tokens at these cache positions (of the sequence's
        first `num_tokens`): the kept tokens move down in order over the dropped ones, the pages
        this empties are released, and each kept token keeps its absolute position. Returns the
        moves (src pages, src slots, dst pages, dst slots) for kvjax.cache.compact."""
        ps, table = self.page_size, self.tables[seq_id]
        keep = np.ones(num_tokens, bool)
        keep[np.asarray(positions, np.int64)] = False
        abs_pos = self._token_positions(seq_id, num_tokens)
        src = np.flatnonzero(keep)
        dst = np.arange(len(src))
        moved = src != dst
        old = np.asarray(table, np.int32)
        first, last = self.pages_needed(len(src)), self.pages_needed(num_tokens)
        released = table[first:last]
        del table[first:last]
        for page in released:
            self._unref(page)
        # Copy on write: a page another sequence shares, or that the prefix cache can hand out
        # (hashed), is never written; the tokens bound for it go to a fresh page instead (all
        # of them, moved or not). Sources are read before any write (compact), so a fresh page
        # may be one just released.
        fresh = np.zeros(len(table), bool)
        lo = int(dst[moved][0]) // ps if moved.any() else len(table)
        for i in range(lo, first):
            if self.refcount[table[i]] > 1 or table[i] in self._page_hash:
                page = self._take()
                self._unref(table[i])
                table[i], fresh[i] = page, True
        sel = moved | fresh[dst // ps]
        new = np.asarray(table, np.int32)
        moves = (old[src[sel] // ps], (src[sel] % ps).astype(np.int32),
                 new[dst[sel] // ps], (dst[sel] % ps).astype(np.int32))
        self._tok_pos[seq_id] = abs_pos[keep]
        self._page_pos.pop(seq_id, None)
        self._evicted[seq_id] = self._evicted.get(seq_id, 0) + num_tokens - len(src)
        self._committed[seq_id] = -1  # never commit again
        return moves

    def _token_positions(self, seq_id: int, n: int) -> np.ndarray:
        """Absolute position of each of the sequence's first n cache positions."""
        known = self._tok_pos.get(seq_id)
        if known is None:  # page-granular (or no) eviction so far
            pages = self._positions(seq_id, -(-n // self.page_size))
            return (np.repeat(np.asarray(pages, np.int64), self.page_size)
                    + np.tile(np.arange(self.page_size), len(pages)))[:n]
        tail = np.arange(len(known), n) + self._evicted.get(seq_id, 0)
        return np.concatenate([known, tail])[:n]

    # ---- prefix cache --------------------------------------------------------------------------
    def match_prefix(self, seq_id: int, tokens: list[int], salt: str | None = None) -> int:
        """Give a new sequence the cached pages of its longest cached prefix; returns the number of
        tokens they hold. Never covers the last token (its logits must be computed). The caller
        counts the query with `record_query` once the sequence is really admitted, nor the last
        `recompute_tail` tokens."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already has pages")
        self.tables[seq_id] = []
        if not self.enable_prefix_caching:
            return 0
        usable = max(0, len(tokens) - self.recompute_tail) // self.page_size * self.page_size
        root = root_hash(self.cache_dtype, self.page_size, salt)
        table, last = self.tables[seq_id], root
        for h in chain_hashes(tokens[:usable], self.page_size, root):
            page = self._hash_to_page.get(h)
            if page is None:
                break
            self._ref(page)
            table.append(page)
            last = h
        hit = len(table) * self.page_size
        if table:
            self._committed[seq_id] = len(table)
            self._last_hash[seq_id] = last
        return hit

    def record_query(self, num_tokens: int, hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += hit_tokens

    def commit(self, seq_id: int, tokens: list[int], salt: str | None = None) -> None:
        """Register the full pages of `tokens` (written to the cache by a finished forward)."""
        if not self.enable_prefix_caching:
            return
        done = self._committed.get(seq_id, 0)
        if done < 0:
            return
        table = self.tables[seq_id]
        full = min(len(tokens) // self.page_size, len(table))
        if full <= done:
            return
        root = root_hash(self.cache_dtype, self.page_size, salt)
        hashes = chain_hashes(tokens[: full * self.page_size], self.page_size, root, done,
                              self._last_hash.get(seq_id))
        for i, h in zip(range(done, full), hashes, strict=True):
            page = table[i]
            if h not in self._hash_to_page and page not in self._page_hash:
                self._hash_to_page[h] = page
                self._page_hash[page] = h
            # else: a duplicate of a page cached meanwhile; it stays unhashed and is freed plainly.
        self._committed[seq_id] = full
        self._last_hash[seq_id] = hashes[-1]

    def reset_prefix_cache(self) -> None:
        """Forget every cached, unreferenced page."""
        for page in list(self._cached):
            del self._hash_to_page[self._page_hash.pop(page)]
            self._free.append(page)
        self._cached.clear()

    # ---- views ---------------------------------------------------------------------------------
    def page_table(self, seq_ids: list[int], max_pages: int) -> np.ndarray:
        return page_table(self.pages, seq_ids, max_pages)

    def evicted(self, seq_id: int) -> int:
        """Tokens evicted from `seq_id` so far."""
        return self._evicted.get(seq_id, 0)

    def _positions(self, seq_id: int, n: int) -> list[int]:
        """Absolute position of the first token of each of the first n table entries."""
        known = list(self._page_pos.get(seq_id, []))
        e = self._evicted.get(seq_id, 0)
        return known[:n] + [j * self.page_size + e for j in range(len(known), n)]

    def page_positions(self, seq_ids: list[int | None], max_pages: int) -> np.ndarray | None:
        """[len(seq_ids), max_pages] int32 absolute position of each table entry's first token,
        for a forward after an eviction (RoPE and ring positions); None when no row has evicted
        anything (positions are cache positions: the forward skips the re-rotation). When a row
        has evicted single tokens, one position per cache slot instead: [len(seq_ids),
        max_pages * page_size] (kvjax.cache.paged.absolute_positions tells them by width)."""
        if not any(s is not None and self._evicted.get(s) for s in seq_ids):
            return None
        if any(s is not None and s in self._tok_pos for s in seq_ids):
            n = max_pages * self.page_size
            out = np.tile(np.arange(n, dtype=np.int32), (len(seq_ids), 1))
            for row, sid in enumerate(seq_ids):
                if sid is not None and self._evicted.get(sid):
                    out[row] = self._token_positions(sid, n)
            return out
        out = np.tile(np.arange(max_pages, dtype=np.int32) * self.page_size, (len(seq_ids), 1))
        for row, sid in enumerate(seq_ids):
            if sid is not None and self._evicted.get(sid):
                out[row] = self._positions(sid, max_pages)
        return out

    def check(self) -> None:
        """Assert the invariants: refcounts equal table references, every page in exactly one
        state, hash maps mutually inverse. For tests."""
        counts = np.zeros(self.num_pages, np.int64)
        for table in self.tables.values():
            for page in table:
                counts[page] += 1
        assert counts[NULL_PAGE] == 0, "the null page is owned"
        assert (counts == self.refcount).all(), "refcounts disagree with the block tables"
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & cached, "a page is both free and cached"
        unref = {p for p in range(1, self.num_pages) if self.refcount[p] == 0}
        assert free | cached == unref, "a page leaked or is free while owned"
        assert cached <= set(self._page_hash), "a cached page has no hash"
        assert not free & set(self._page_hash), "a free page still has a hash"
        assert {p: h for h, p in self._hash_to_page.items()} == self._page_hash


def page_table(pages_of: Callable[[int], list[int]], seq_ids: list[int],
               max_pages: int) -> np.ndarray:
    """[len(seq_ids), max_pages] int32 rows of each sequence's pages (`pages_of(seq_id)`), padded
    with the null page (unowned entries point at it)."""
    table = np.full((len(seq_ids), max_pages), NULL_PAGE, np.int32)
    for row, sid in enumerate(seq_ids):
        pages = pages_of(sid)
        if len(pages) > max_pages:
            raise ValueError(f"sequence {sid} has {len(pages)} pages > max_pages {max_pages}")
        table[row, : len(pages)] = pages
    return table
