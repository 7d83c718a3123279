"""The serving engine: a request queue, continuous batching with chunked prefill, reference-counted
pages with prefix caching, preemption by recompute, eviction, and precision routing over pools.

One engine step, per page pool:

1. Running requests first, oldest first: each gets its next chunk (1 token when decoding, up to
   `chunk_size` of a prompt still being prefilled) within the step's token budget
   (`max_num_batched_tokens`); a chunk the budget cuts short is cut at a chunk bucket, so it
   runs unpadded (`schedule.chunk_len`). When the pool has no page for a chunk, the *newest*
   running request is preempted: its pages are released, it goes back to the head of the queue,
   and it is recomputed from its tokens later (prompt + what it generated so far), so greedy
   output is unchanged and nothing is dropped.
2. If nothing was preempted, waiting requests are admitted (up to `max_num_seqs` running): the
   prefix cache gives them the pages of their longest cached full-page prefix, and their first
   prompt chunk is scheduled.
3. The rows run through the model in one call per chunk bucket (decode rows [B, 1], prefill
   chunks [B, T] with T in 16/32/64/128/256), padded to bucketed shapes so the jitted forward
   compiles a handful of times and a short chunk never pads to a long one.
   Rows whose chunk reaches the end of their tokens sample a token; full pages just written are
   registered in the prefix cache.

The model is driven only through `Runner.forward_batch(tokens, positions, page_table, lengths)`;
the cache is an opaque pytree inside the runner, and page ids are all the engine manages. Each pool
is a Runner (its own cache layout and dtype, the same parameter arrays) plus a BlockManager, so a
"full precision" pool and a compressed pool share one engine and one set of weights; requests over a
token threshold, or flagged by the client, are routed to the full-precision pool.

Steps 1-2 are `_schedule` (kvjax/engine/schedule.py), step 3 `_execute` here and `_build`
(kvjax/engine/batch.py).

Threading: `add_request` / `abort` may be called from any thread; `step` runs on one thread (the
background loop started by `start`, or the caller's in `generate`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import jax
import numpy as np

from kvjax import sharding
from kvjax.config import Config
from kvjax.engine.batch import BatchMixin
from kvjax.engine.eviction import EvictionConfig
from kvjax.engine.loop import LoopMixin
from kvjax.engine.metrics import Metrics
from kvjax.engine.planner import kv_split, size_pool
from kvjax.engine.pool import EngineConfig, Pool, RequestError, _bucket
from kvjax.engine.request import Request, SamplingParams
from kvjax.engine.schedule import ScheduleMixin
from kvjax.engine.step import Channel, execute, fetch
from kvjax.engine.warmup import WarmupMixin
from kvjax.quant import weights
from kvjax.runner import CHUNK_BUCKETS, param_dtype

log = logging.getLogger("kvjax.engine")

class Engine(ScheduleMixin, BatchMixin, WarmupMixin, LoopMixin):
    def __init__(self, cfg: Config, params: dict, ecfg: EngineConfig | None = None,
                 eos_ids: tuple[int, ...] = (), model_name: str | None = None,
                 mesh: jax.sharding.Mesh | None = None):
        """mesh: run every step sharded over it (tensor x data parallel). In a multi-process run
        every process builds the same Engine; process 0 schedules, the others call `follow`."""
        self.cfg = cfg
        self.mesh = mesh
        self.ecfg = ecfg = ecfg or EngineConfig()
        self.eos_ids = tuple(eos_ids)
        self.model_name = model_name or cfg.name
        self.max_model_len = ecfg.max_model_len or cfg.model.max_position
        if self.max_model_len > cfg.model.max_position:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context "
                             f"{cfg.model.max_position}")
        self.metrics = Metrics()
        dtype = param_dtype(cfg)
        if mesh is None:
            # Convert once (quantizing projections when --weight-dtype asks), so every pool's
            # Runner holds the same parameter buffers.
            params = weights.prepare(params, cfg.model, dtype)
            weight_bytes = weights.nbytes(params)
        else:  # shard once; the Runners see arrays already in place and keep them
            weight_bytes = sharding.per_device_bytes(
                sharding.abstract_params(cfg.model, mesh, dtype))
            params = sharding.shard_params(params, cfg.model, mesh, dtype)
        num_pages, memory_line = size_pool(cfg, ecfg, self.max_model_len, int(weight_bytes), mesh)
        if jax.process_count() > 1:  # every process must build the same cache: process 0's size
            from jax.experimental import multihost_utils

            num_pages = int(multihost_utils.broadcast_one_to_all(np.int32(num_pages)))
        self.pools: dict[str, Pool] = {}
        self.pools["default"] = Pool("default", cfg, params, num_pages, self.max_model_len, ecfg,
                                     mesh)
        if ecfg.full_precision_pages:
            fp = ecfg.full_precision_dtype or ("f32" if jax.default_backend() == "cpu" else "bf16")
            self.pools["full"] = Pool("full", cfg.replace_cache(dtype=fp), params,
                                      ecfg.full_precision_pages, self.max_model_len, ecfg, mesh)
        del params
        self.startup_lines = [memory_line]
        if mesh is not None:
            m, split = mesh.shape, kv_split(cfg, mesh)
            self.startup_lines.append(
                f"Mesh: data={m[sharding.DATA]} x tensor={m[sharding.TENSOR]} over "
                f"{jax.process_count()} process(es); {cfg.model.num_kv_heads} KV heads "
                + (f"split {split} ways" if split > 1 else "replicated on every tensor device")
                + "; KV capacity below is per data-parallel replica")
        for pool in self.pools.values():
            pages_per_req = -(-self.max_model_len // pool.page_size)
            if pool.bm.num_pages - 1 < pages_per_req:
                raise ValueError(
                    f"max_model_len {self.max_model_len} is larger than the maximum number of "
                    f"tokens that can be stored in the {pool.name} KV cache ({pool.kv_tokens}); "
                    "raise --num-kv-pages or lower --max-model-len")
            self.startup_lines += [
                f"KV cache size: {pool.kv_tokens:,} tokens"
                + (f" ({pool.name} pool, {pool.cfg.cache.dtype})" if len(self.pools) > 1 else ""),
                f"Maximum concurrency for {self.max_model_len:,} tokens per request: "
                f"{pool.kv_tokens / self.max_model_len:.2f}x",
            ]
        self._incoming: collections.deque[Request] = collections.deque()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.channel = Channel(cfg.model.vocab_size)  # process 0 -> the others, per step
        self.warmup_done = threading.Event()
        self._warmup_thread: threading.Thread | None = None
        self.steps = 0

    # ---- requests ------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt_ids: list[int],
                     params: SamplingParams | None = None, cache_salt: str | None = None,
                     eviction: EvictionConfig | None = None, precision: str = "auto") -> Request:
        """Validate and build a request (RequestError on anything the engine cannot serve)."""
        params = params or SamplingParams()
        eviction = eviction or self.ecfg.eviction
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.cfg.model.vocab_size for t in prompt_ids):
            raise RequestError("prompt token ids must be in [0, vocab_size)")
        if params.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1")
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
            raise RequestError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
        if precision not in ("auto", "full", "default"):
            raise RequestError("kv_precision must be auto, full or default")
        if len(prompt_ids) >= self.max_model_len and not eviction.enabled:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {len(prompt_ids)} tokens (at least one more is generated).")
        if eviction.enabled:
            ps = self.cfg.cache.page_size
            if eviction.max_cache_tokens(ps, self.ecfg.chunk_size) > self.max_model_len:
                raise RequestError("eviction sinks + window + chunk exceed max_model_len")
            if eviction.granularity == "token" and jax.process_count() > 1:
                raise RequestError("token-granular eviction runs on one process (its "
                                   "compaction is not sent to the others); use page")
        req = Request(request_id, list(prompt_ids), params, cache_salt, eviction, precision)
        pool = self._route(req)
        ring = pool.cfg.cache.window_for(pool.cfg.cache.dtype)
        if eviction.enabled and eviction.window < ring:
            raise RequestError(f"the eviction window ({eviction.window}) must cover the "
                               f"{pool.cfg.cache.dtype} cache's {ring}-token bf16 window")
        req.pool = pool.name
        return req

    def add_request(self, req: Request) -> Request:
        with self._lock:
            self._incoming.append(req)
        self._wake.set()
        return req

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
        self._wake.set()

    def has_work(self) -> bool:
        return bool(self._incoming or self._aborts
                    or any(p.waiting or p.running for p in self.pools.values()))

    def _route(self, req: Request) -> Pool:
        if "full" not in self.pools or req.precision == "default":
            return self.pools["default"]
        if req.precision == "full":
            return self.pools["full"]
        t = self.ecfg.full_precision_threshold
        return self.pools["full"] if t and len(req.prompt_ids) > t else self.pools["default"]

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One scheduling round over every pool; returns the requests that finished."""
        with self._lock:
            incoming, self._incoming = list(self._incoming), collections.deque()
            aborts, self._aborts = self._aborts, set()
        for req in incoming:
            pool = self.pools[req.pool or self._route(req).name]
            req.pool = pool.name
            pool.waiting.append(req)
        finished: list[Request] = []
        for pool in self.pools.values():
            if aborts:
                for req in [r for r in (*pool.running, *pool.waiting) if r.request_id in aborts]:
                    self._finish(pool, req, "abort")
                    finished.append(req)
            rows = []
            try:
                rows = self._schedule(pool)
                if rows:
                    finished += self._execute(pool, rows)
            except Exception as e:  # fail this step's requests only; the loop serves the rest
                log.exception("engine step failed for %d request(s)", len(rows))
                finished += self._recover(pool, [r for r, _, _ in rows], e)
        self.steps += 1
        return finished

    def _recover(self, pool: Pool, failed: list[Request], error: Exception) -> list[Request]:
        """Mark `failed` as errored. If the failed call had consumed the donated cache, the other
        running requests lost their KV: rebuild the cache and recompute them (preemption)."""
        msg = f"{type(error).__name__}: {error}"
        done = []
        for req in failed:
            if not req.finished:
                req.error = msg
                self._finish(pool, req, "error")
                done.append(req)
        if any(x.is_deleted() for x in jax.tree.leaves(pool.runner.cache)):
            for req in list(pool.running):
                self._preempt(pool, req)
            pool.bm.reset_prefix_cache()  # their pages' contents went with the cache
            pool.runner.reset_cache()
        return done

    def _execute(self, pool: Pool, rows: list[tuple[Request, int, int]]) -> list[Request]:
        finished = []
        # One forward per chunk bucket, so a short chunk is never padded to a long one's length.
        buckets = sorted({_bucket(n, CHUNK_BUCKETS) for _, _, n in rows})
        groups = [[r for r in rows if _bucket(r[2], CHUNK_BUCKETS) == t] for t in buckets]
        index = list(self.pools).index(pool.name)
        launched, failed = [], []
        for group in groups:  # dispatch every forward + sampler before reading any result
            try:
                step, wants = self._build(pool, index, group)
                self.channel.send(step)
                launched.append((group, wants, step.flags, execute(pool.runner, step)))
            except Exception as e:  # this group's requests fail; the other groups go on
                failed.append((group, e))
        for group, wants, flags, out in launched:
            try:
                host = fetch(out, flags) if out is not None else None
            except Exception as e:
                failed.append((group, e))
                continue
            now = time.perf_counter()
            for row, (req, start, n) in enumerate(group):
                if start < len(req.prompt_ids):
                    self.metrics.inc("prefill_kv_computed_tokens",
                                     min(start + n, len(req.prompt_ids)) - start)
                req.num_computed = start + n
                if not req.eviction.enabled:
                    pool.bm.commit(req.seq_id, req.cache_tokens[: req.num_computed],
                                   req.cache_salt)
                if not wants[row]:
                    continue
                self._record_logprobs(req, host, row)
                if self._append(pool, req, int(host[0][row]), now):
                    finished.append(req)
        for group, e in failed:
            log.error("engine step failed for %d request(s): %s", len(group), e, exc_info=e)
            finished += self._recover(pool, [r for r, _, _ in group], e)
        return finished

    def _append(self, pool: Pool, req: Request, token: int, now: float) -> bool:
        req.output_ids.append(token)
        req.cache_tokens.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
            with self.metrics.lock:
                self.metrics.ttft.observe(now - req.arrival)
                self.metrics.counters["prompt_tokens"] += len(req.prompt_ids)
        elif req.last_token_time is not None and len(req.output_ids) > 1:
            with self.metrics.lock:
                self.metrics.itl.observe(now - req.last_token_time)
        req.last_token_time = now
        self.metrics.inc("generation_tokens")
        p = req.params
        reason = None
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif len(req.output_ids) >= p.max_tokens:
            reason = "length"
        elif not req.eviction.enabled and req.num_tokens >= self.max_model_len:
            reason = "length"
        if req.out is not None:
            req.out.put((token, reason))
        if reason:
            self._finish(pool, req, reason, notify=False)
            return True
        return False

    def _finish(self, pool: Pool, req: Request, reason: str, notify: bool = True) -> None:
        req.finish_reason = reason
        pool.bm.free(req.seq_id)
        pool.runner.free(req.seq_id)
        if req in pool.running:
            pool.running.remove(req)
        elif req in pool.waiting:
            pool.waiting.remove(req)
        if reason == "error":  # the server answers 500 to this client and counts a failure
            with self.metrics.lock:
                c = self.metrics.counters
                c["request_failure"] = c.get("request_failure", 0) + 1
        elif reason != "abort":
            self.metrics.inc("request_success")
            with self.metrics.lock:
                self.metrics.e2e.observe(time.perf_counter() - req.arrival)
        if notify and req.out is not None:
            req.out.put((None, reason))

    # ---- drivers -------------------------------------------------------------------------------
    def stats(self) -> list[dict]:
        return [p.snapshot() for p in self.pools.values()]
