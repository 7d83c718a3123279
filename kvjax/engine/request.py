"""Requests and their sampling parameters, as the engine tracks them."""

from __future__ import annotations

import itertools
import queue
import time
from dataclasses import dataclass, field

from kvjax.engine.eviction import EvictionConfig, H2OScores


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Read by kvjax.sampling.pack (see /work/notes/sampling_api.md); defaults switch them off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens are out
    logprobs: int | None = None  # None = off, 0 = the sampled token's, n = also the top n (<= 20)


_seq_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    cache_salt: str | None = None
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    precision: str = "auto"  # auto | full | default: which page pool serves it
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    # ---- state ----
    output_ids: list[int] = field(default_factory=list)
    cache_tokens: list[int] = field(default_factory=list)  # tokens the cache holds, cache order
    num_computed: int = 0  # leading cache_tokens whose K/V are in the cache
    num_cached_prompt: int = -1  # prompt tokens served by the prefix cache at first admission
    num_evicted: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None  # what failed, when finish_reason == "error"
    pool: str = ""
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    last_token_time: float | None = None
    out: queue.Queue | None = None  # (token id | None, finish reason) per event, for servers
    # When params.logprobs is not None the engine appends, per output token and before putting it
    # on `out`: its logprob, and (logprobs > 0) the top-n [(token id, logprob)] of that step.
    output_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    h2o: H2OScores | None = None

    def __post_init__(self) -> None:
        if not self.cache_tokens:
            self.cache_tokens = list(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
