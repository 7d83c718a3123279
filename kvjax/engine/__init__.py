"""Serving engine: continuous batching with chunked prefill over reference-counted pages, prefix
caching, preemption by recompute, StreamingLLM/H2O eviction and precision routing."""

from kvjax.cache.block_manager import BlockManager, OutOfPages
from kvjax.engine.engine import Engine, EngineConfig, RequestError
from kvjax.engine.eviction import EvictionConfig
from kvjax.engine.request import Request, SamplingParams

__all__ = ["BlockManager", "Engine", "EngineConfig", "EvictionConfig", "OutOfPages", "Request",
           "RequestError", "SamplingParams"]
