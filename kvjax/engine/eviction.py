"""Eviction for unbounded sessions: StreamingLLM (attention sinks + a recent window) and H2O (heavy
hitters by accumulated attention + a recent window), at page granularity.

Both policies keep the first `sink_pages` pages (StreamingLLM's 4 sink tokens live in page 0 for
any page size >= 4) and the most recent `window` tokens, and drop *whole computed pages* in
between, so a page is either fully kept or fully released to the block manager; nothing is copied
on the device.

Positions (a deliberate choice, see the engine's docstring too): the cache stores keys after RoPE,
and the model applies RoPE and picks cache slots from one `positions` input. After an eviction the
engine feeds new tokens at their *cache index* (tokens held before them), so positions never grow
past sinks + window + one chunk and the session is unbounded. Keys already in the cache keep the
rotation they were written with (no re-rotation), which is StreamingLLM's "positions within the
cache" for the newest tokens and an approximation for older window tokens (their distance to new
queries shrinks by the evicted amount). Exact StreamingLLM needs pre-RoPE keys in the cache or a
forward that takes RoPE positions apart from cache positions (`rope_positions`): a model change.

H2O needs, per sequence and key, the attention mass the key has received. The model does not
return attention weights today; the engine feeds `observe(...)` when a runner exposes them (see
`Runner.attention_mass`, not there yet) and otherwise every score stays 0, so H2O evicts the oldest
middle page, exactly like StreamingLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EvictionConfig:
    policy: str = "none"  # none | streaming | h2o
    sink_tokens: int = 4  # StreamingLLM: 4 initial tokens suffice (paper, Table 1)
    window: int = 512  # recent tokens always kept
    heavy_tokens: int = 128  # H2O: heavy-hitter budget beside the window

    def __post_init__(self) -> None:
        if self.policy not in ("none", "streaming", "h2o"):
            raise ValueError(f"unknown eviction policy {self.policy!r}; none, streaming or h2o")
        if self.sink_tokens < 0 or self.window < 1 or self.heavy_tokens < 0:
            raise ValueError("eviction sizes must be non-negative (window >= 1)")

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def max_cache_tokens(self, page_size: int, chunk: int) -> int:
        """Tokens a sequence can hold at once under this policy (for admission checks)."""
        pages = (-(-self.sink_tokens // page_size) + -(-self.window // page_size)
                 + (-(-self.heavy_tokens // page_size) if self.policy == "h2o" else 0) + 1)
        return pages * page_size + chunk


def pages_to_drop(cfg: EvictionConfig, num_computed: int, page_size: int,
                  page_scores: np.ndarray | None = None) -> list[int]:
    """Indices (into the sequence's block table) of computed pages to release now.

    num_computed: tokens written to the cache; only its full pages are candidates. page_scores:
    accumulated attention mass per page of the table (H2O), or None.
    """
    if not cfg.enabled:
        return []
    full = num_computed // page_size
    sink = -(-cfg.sink_tokens // page_size)
    recent = -(-cfg.window // page_size)
    heavy = -(-cfg.heavy_tokens // page_size) if cfg.policy == "h2o" else 0
    middle = list(range(sink, max(full - recent, sink)))  # candidates, oldest first
    excess = len(middle) - heavy
    if excess <= 0:
        return []
    if cfg.policy == "streaming" or page_scores is None:
        return middle[:excess]
    scores = np.asarray(page_scores, np.float64)[middle]
    order = np.argsort(scores, kind="stable")  # lowest mass first; ties -> oldest first
    return sorted(middle[i] for i in order[:excess])


class H2OScores:
    """Accumulated attention mass per cached token of one sequence, kept page-aligned."""

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
