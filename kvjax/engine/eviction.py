"""Eviction for unbounded sessions: StreamingLLM (attention sinks + a recent window) and H2O (heavy
hitters by accumulated attention + a recent window), at page or token granularity.

Token granularity (`granularity="token"`): tokens are dropped one by one and the kept ones
compacted on device, in order (kvjax/cache/compact.py copies each moved token's codes and
per-token metadata, and its attention mass); each token keeps its own absolute position
(`BlockManager.page_positions` then returns one per cache slot), so keys are re-rotated per token
by the same rule as below. A KIVI cache evicts whole pages at either granularity (its keys are
quantized per channel over a page: see compact.py).

Both policies keep the first `sink_pages` pages (StreamingLLM's 4 sink tokens live in page 0 for
any page size >= 4) and the most recent `window` tokens, and drop *whole computed pages* in
between, so a page is either fully kept or fully released to the block manager; nothing is copied
on the device.

Positions within the cache (StreamingLLM's rule): keys are stored rotated for their absolute
position and never rewritten (so compressed pages stay as written). After an eviction the engine
passes each page's absolute start (`BlockManager.page_positions`); attention re-rotates each page's
keys by the number of evicted tokens after it (kvjax/attention.py `rerotate_keys`), so every
query-key pair is scored at its distance in the cache: for StreamingLLM only the sink pages turn
(the window sits after every evicted page), for H2O each kept page by what was evicted after it.
Cache positions (page table, lengths, masks) stay compact, so a session is unbounded; the ring of
a compressed cache's bf16 window is indexed by absolute position, which eviction never changes,
and the eviction window must cover the ring window so evicted pages never hold ring tokens.

H2O's heavy-hitter scores are the attention mass each cached token received, accumulated on
device by the XLA attention path (`Segment.mass`, per page, token and KV head, summed over layers,
query rows and the query heads of a KV head) and read for the pages of a sequence only when it has
pages to drop. Pages are scored by the sum of their tokens' mass over KV heads (`page_scores`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GRANULARITIES = ("page", "token")


@dataclass(frozen=True)
class EvictionConfig:
    policy: str = "none"  # none | streaming | h2o
    sink_tokens: int = 4  # StreamingLLM: 4 initial tokens suffice (paper, Table 1)
    window: int = 512  # recent tokens always kept
    heavy_tokens: int = 128  # H2O: heavy-hitter budget beside the window
    # "page": whole pages are dropped, nothing moves; "token": tokens are dropped one by one
    # and the kept ones compacted on device (kvjax/cache/compact.py)
    granularity: str = "page"

    def __post_init__(self) -> None:
        if self.policy not in ("none", "streaming", "h2o"):
            raise ValueError(f"unknown eviction policy {self.policy!r}; none, streaming or h2o")
        if self.sink_tokens < 0 or self.window < 1 or self.heavy_tokens < 0:
            raise ValueError("eviction sizes must be non-negative (window >= 1)")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown eviction granularity {self.granularity!r}; page or token")

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def max_cache_tokens(self, page_size: int, chunk: int) -> int:
        """Tokens a sequence can hold at once under this policy (for admission checks)."""
        pages = (-(-self.sink_tokens // page_size) + -(-self.window // page_size)
                 + (-(-self.heavy_tokens // page_size) if self.policy == "h2o" else 0) + 1)
        # token: up to a page of excess waits for the next compaction (tokens_to_drop)
        return (pages + (self.granularity == "token")) * page_size + chunk


def pages_to_drop(cfg: EvictionConfig, num_computed: int, page_size: int,
                  page_scores: np.ndarray | Callable[[], np.ndarray] | None = None) -> list[int]:
    """Indices (into the sequence's block table) of computed pages to release now.

    num_computed: tokens written to the cache; only its full pages are candidates. page_scores:
    accumulated attention mass per page of the table (H2O), a callable returning it (read only
    when something is to be dropped: it may cost a device transfer), or None.
    """
    if not cfg.enabled:
        return []
    scores = None
    if page_scores is not None:
        scores = page_scores if callable(page_scores) else (lambda: page_scores)
    return _units_to_drop(cfg, num_computed // page_size, page_size, 1, scores)


def _units_to_drop(cfg: EvictionConfig, full: int, unit: int, min_excess: int,
                   unit_scores: Callable[[], np.ndarray] | None) -> list[int]:
    """The rule both granularities share, over `full` complete units of `unit` tokens (a page,
    or a token / KIVI page for token granularity): the first ceil(sinks / unit) units and the
    last ceil(window / unit) stay; H2O keeps its ceil(heavy_tokens / unit) units of highest mass
    among the rest; the others go (sorted), unless fewer than `min_excess` would.
    unit_scores: returns the accumulated mass per unit, read only when something is dropped."""
    sink = -(-cfg.sink_tokens // unit)
    recent = -(-cfg.window // unit)
    heavy = -(-cfg.heavy_tokens // unit) if cfg.policy == "h2o" else 0
    middle = list(range(sink, max(full - recent, sink)))  # candidate units, oldest first
    excess = len(middle) - heavy
    if excess <= 0 or excess < min_excess:
        return []
    if cfg.policy == "streaming" or unit_scores is None:
        return middle[:excess]
    scores = np.asarray(unit_scores(), np.float64)[middle]
    order = np.argsort(scores, kind="stable")  # lowest mass first; ties -> oldest first
    return sorted(middle[i] for i in order[:excess])


def tokens_to_drop(cfg: EvictionConfig, num_computed: int, unit: int, page_size: int,
                   token_scores: np.ndarray | Callable[[], np.ndarray] | None = None
                   ) -> list[int]:
    """Token-granular eviction: cache positions (sorted) of the tokens to drop now.

    Tokens are taken in aligned units of `unit` (1; a KIVI cache's page, see compact.py). The
    first ceil(sinks / unit) units and the units of the last `window` computed tokens stay, H2O
    keeps its `heavy_tokens` (in units) of highest mass among the rest (ties: the newer), and
    the others go. Nothing is dropped until at least a page's worth of tokens is excess, so
    the compaction that follows (a copy of every kept token after the first hole) runs at most
    once per `page_size` tokens and always releases a page. token_scores: accumulated mass per
    cached token (H2O), or a callable returning it (read only when something is dropped)."""
    if not cfg.enabled:
        return []
    full = num_computed // unit

    def unit_scores() -> np.ndarray:
        scores = token_scores() if callable(token_scores) else token_scores
        return np.asarray(scores, np.float64)[: full * unit].reshape(full, unit).sum(axis=1)

    units = _units_to_drop(cfg, full, unit, -(-page_size // unit),
                           None if token_scores is None else unit_scores)
    return [u * unit + j for u in units for j in range(unit)]


def page_scores(mass: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """Per-page H2O scores from accumulated mass [pages, kv_heads, page_size]: the pages' tokens
    summed, over KV heads by `reduce` ("sum": all heads; "max": the head that uses the page most,
    so a page one head depends on is kept even when the others ignore it)."""
    per_head = np.asarray(mass, np.float64).sum(axis=2)  # [pages, kv_heads]
    if reduce == "sum":
        return per_head.sum(axis=1)
    if reduce == "max":
        return per_head.max(axis=1)
    raise ValueError(f"reduce must be sum or max, got {reduce!r}")


def token_scores(mass: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """Per-token H2O scores from accumulated mass [pages, kv_heads, page_size] -> [pages *
    page_size] (table order), over KV heads by `reduce` as in `page_scores`."""
    m = np.asarray(mass, np.float64)
    if reduce == "sum":
        per = m.sum(axis=1)
    elif reduce == "max":
        per = m.max(axis=1)
    else:
        raise ValueError(f"reduce must be sum or max, got {reduce!r}")
    return per.reshape(-1)


def evict_sequence(cfg: EvictionConfig, bm, runner, seq_id: int, num_computed: int,
                   reduce: str = "sum") -> list[int]:
    """Apply `cfg` to one sequence held by BlockManager `bm` over `runner`'s device cache:
    release its pages (page granularity) or drop tokens and compact the kept ones on device
    (token granularity; the runner's cache is replaced). Returns the cache positions dropped
    (sorted), so the caller can drop the same tokens from its own token list."""
    from kvjax.cache.paged import attention_mass

    if not cfg.enabled:
        return []
    ps = bm.page_size
    pages = list(bm.pages(seq_id))
    from kvjax.cache.compact import compact, eviction_unit

    unit = eviction_unit(runner.cache)
    if cfg.granularity == "page" or unit == ps:  # whole pages: nothing to move
        drop = pages_to_drop(cfg, num_computed, ps, lambda: page_scores(
            attention_mass(runner.cache, pages), reduce))
        if drop:
            bm.drop_pages(seq_id, drop)
        return [i * ps + j for i in drop for j in range(ps)]
    drop = tokens_to_drop(cfg, num_computed, unit, ps, lambda: token_scores(
        attention_mass(runner.cache, pages), reduce))
    if drop:
        moves = bm.drop_tokens(seq_id, drop, num_computed)
        runner.cache = compact(runner.cache, *moves)
    return drop


class H2OScores:
    """Accumulated attention mass per cached token of one sequence, kept page-aligned, on the
    host (for callers that observe attention themselves; the engine reads `Segment.mass`)."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.tokens = np.zeros(0, np.float64)

    def observe(self, mass: np.ndarray) -> None:
        """mass: [cache tokens] attention received by each cached key this step (summed over
        heads and query rows); longer than before when tokens were appended."""
        mass = np.asarray(mass, np.float64)
        if len(mass) > len(self.tokens):
            self.tokens = np.concatenate([self.tokens, np.zeros(len(mass) - len(self.tokens))])
        self.tokens[: len(mass)] += mass

    def grow(self, num_tokens: int) -> None:
        if num_tokens > len(self.tokens):
            self.tokens = np.concatenate([self.tokens, np.zeros(num_tokens - len(self.tokens))])

    def page_scores(self, num_pages: int) -> np.ndarray:
        self.grow(num_pages * self.page_size)
        return self.tokens[: num_pages * self.page_size].reshape(num_pages, -1).sum(axis=1)

    def drop(self, page_indices: list[int]) -> None:
        keep = np.ones(len(self.tokens), bool)
        for i in page_indices:
            keep[i * self.page_size:(i + 1) * self.page_size] = False
        self.tokens = self.tokens[keep]
