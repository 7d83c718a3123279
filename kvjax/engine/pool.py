"""The engine's configuration and its page pools (split out of engine.py, no behaviour change)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import jax

from kvjax.cache.block_manager import BlockManager
from kvjax.config import Config
from kvjax.engine.eviction import EvictionConfig
from kvjax.engine.request import Request
from kvjax.runner import Runner

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Decode steps ([B, 1]) also take the 1.5x rungs past 8: a decode step's cost grows with its rows
# (XLA attention reads every row's pages, padding rows included), and the rows of a draining batch
# pass through every count, so 17 rows padded to 32 paid for 15 empty rows (kvjax/engine/
# batch.py). Prefill groups keep powers of two (few rows; each rung is a compile per width).
DECODE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
GIB = 2**30


class RequestError(ValueError):
    """A request the engine cannot serve (too long, bad parameters): a 400 for the server."""


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32  # requests in the running batch
    max_model_len: int = 0  # prompt + output tokens per request (0 = the model's max_position)
    max_num_batched_tokens: int = 512  # tokens per step and pool (decode rows + prefill chunks)
    chunk_size: int = 256  # most prompt tokens one request prefills in one step
    num_pages: int = 0  # pages in the main pool (0 = size from gpu_memory_utilization)
    gpu_memory_utilization: float = 0.9  # fraction of device memory for weights + activations + KV
    enable_prefix_caching: bool = False
    eviction: EvictionConfig = field(default_factory=EvictionConfig)  # default for requests
    full_precision_pages: int = 0  # pages of the full-precision pool (0 = no such pool)
    full_precision_dtype: str = ""  # its cache dtype ("" = f32 on CPU, bf16 elsewhere)
    full_precision_threshold: int = 0  # prompts longer than this go to it (0 = only if flagged)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= n), n)


class Pool:
    """One page pool: a Runner (cache + compiled forward) and the BlockManager of its pages."""

    def __init__(self, name: str, cfg: Config, params: dict, num_pages: int, max_model_len: int,
                 ecfg: EngineConfig, mesh: jax.sharding.Mesh | None = None):
        self.name = name
        self.cfg = cfg.replace_cache(num_pages=num_pages)
        self.runner = Runner(self.cfg, params, max_seq_len=max_model_len,
                             max_batch=ecfg.max_num_seqs, mesh=mesh)
        self.page_size = self.cfg.cache.page_size
        # Layouts with a full-precision window read a sequence's last W tokens from its own ring
        # buffer. A prefix hit therefore stops W tokens short of the prompt's end, so prefill
        # writes them into the new sequence's ring (pages before that hold every token's codes;
        # KIVI's are sealed). The ring is indexed and tagged by absolute position, so eviction
        # (whose window must cover the ring's) never corrupts it (kvjax/cache/paged.py).
        window = self.cfg.cache.window_for(self.cfg.cache.dtype)
        self.windowed = window > 0
        self.bm = BlockManager(num_pages, self.page_size, self.cfg.cache.dtype,
                               ecfg.enable_prefix_caching, recompute_tail=window)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []

    @property
    def kv_tokens(self) -> int:
        return (self.bm.num_pages - 1) * self.page_size

    def snapshot(self) -> dict:
        return {"pool": self.name, "usage": self.bm.usage(), "queries": self.bm.prefix_queries,
                "hits": self.bm.prefix_hits, "running": len(self.running),
                "waiting": len(self.waiting), "num_pages": self.bm.num_pages,
                "page_size": self.page_size, "dtype": self.cfg.cache.dtype}
