"""The engine's scheduler (split out of engine.py): which chunk of which request runs in a step,
eviction before a request's chunk is scheduled, and preemption by recompute when the pool has no
page for a chunk. The policy is described in kvjax/engine/engine.py's module docstring."""

from __future__ import annotations

import logging

from kvjax.cache.paged import attention_mass
from kvjax.engine.eviction import H2OScores, evict_sequence, page_scores, pages_to_drop
from kvjax.engine.pool import Pool
from kvjax.engine.request import Request
from kvjax.runner import CHUNK_BUCKETS

log = logging.getLogger("kvjax.engine")


def chunk_len(n: int, rest: int) -> int:
    """Tokens to prefill now: n, or, when the step's budget (or chunk_size) cuts the request short
    of its remaining `rest` tokens, the largest chunk bucket <= n. A forward pads each chunk to
    its bucket and each group's rows to a power of two, so budget-cut chunks (224 tokens run as
    256, then a 32-token tail as 64) made padding a large share of the prefill work at
    concurrency 32, where the decode rows leave 480 of the 512 tokens (BENCHMARKS.md)."""
    if n >= rest or n <= CHUNK_BUCKETS[1]:
        return n
    return max(b for b in CHUNK_BUCKETS if b <= n)


class ScheduleMixin:
    """Methods of `Engine` (kvjax/engine/engine.py) that pick each step's rows."""

    def _preempt(self, pool: Pool, req: Request) -> None:
        pool.bm.free(req.seq_id)
        pool.runner.free(req.seq_id)
        req.num_computed = 0
        req.num_preemptions += 1
        if req.h2o is not None:
            req.h2o = H2OScores(pool.page_size)
        pool.running.remove(req)
        pool.waiting.appendleft(req)
        self.metrics.inc("num_preemptions")
        log.info("preempted request %s (%d tokens) to free pages", req.request_id,
                 len(req.cache_tokens))

    def _evict(self, pool: Pool, req: Request) -> None:
        ecfg = req.eviction
        if not ecfg.enabled:
            return
        if ecfg.granularity == "token":  # tokens dropped, the kept ones compacted on device
            drop = evict_sequence(ecfg, pool.bm, pool.runner, req.seq_id, req.num_computed)
            if drop:
                gone = set(drop)
                req.cache_tokens = [t for i, t in enumerate(req.cache_tokens) if i not in gone]
                req.num_computed -= len(drop)
                req.num_evicted += len(drop)
            return
        scores = None
        if ecfg.policy == "h2o":  # attention mass accumulated on device, read only if needed
            pages = list(pool.bm.pages(req.seq_id))
            scores = lambda: page_scores(attention_mass(pool.runner.cache, pages))  # noqa: E731
        drop = pages_to_drop(ecfg, req.num_computed, pool.page_size, scores)
        if not drop:
            return
        pool.bm.drop_pages(req.seq_id, drop)
        ps = pool.page_size
        for i in sorted(drop, reverse=True):
            del req.cache_tokens[i * ps:(i + 1) * ps]
        req.num_computed -= len(drop) * ps
        req.num_evicted += len(drop) * ps
        if req.h2o is not None:
            req.h2o.drop(drop)

    def _schedule(self, pool: Pool) -> list[tuple[Request, int, int]]:
        """(request, start, n): append cache_tokens[start:start+n] of each request this step."""
        ecfg, bm = self.ecfg, pool.bm
        budget = ecfg.max_num_batched_tokens
        rows: list[tuple[Request, int, int]] = []
        preempted = False
        limit = pool.runner.max_seq_len
        i = 0
        while i < len(pool.running) and budget > 0:
            req = pool.running[i]
            self._evict(pool, req)
            start = req.num_computed
            rest = len(req.cache_tokens) - start
            n = chunk_len(min(rest, budget, ecfg.chunk_size, limit - start), rest)
            if n <= 0:
                i += 1
                continue
            while not bm.can_grow(req.seq_id, start + n):
                victim = pool.running[-1]
                self._preempt(pool, victim)
                preempted = True
                if victim is req:
                    break
            if req not in pool.running:
                break
            bm.ensure(req.seq_id, start + n)
            rows.append((req, start, n))
            budget -= n
            i += 1
        while (not preempted and pool.waiting and budget > 0
               and len(pool.running) < ecfg.max_num_seqs):
            req = pool.waiting[0]
            hit = bm.match_prefix(req.seq_id, req.cache_tokens, req.cache_salt)
            rest = len(req.cache_tokens) - hit
            n = chunk_len(min(rest, budget, ecfg.chunk_size, limit - hit), rest)
            if not bm.can_grow(req.seq_id, hit + n):
                bm.free(req.seq_id)
                break
            bm.ensure(req.seq_id, hit + n)
            bm.record_query(len(req.cache_tokens), hit)
            if req.num_cached_prompt < 0:
                req.num_cached_prompt = hit
            req.num_computed = hit
            if req.eviction.policy == "h2o" and req.h2o is None:
                req.h2o = H2OScores(pool.page_size)
            if req.eviction.policy == "h2o":  # idempotent; a reset cache starts without it
                pool.runner.track_attention_mass()
            pool.waiting.popleft()
            pool.running.append(req)
            rows.append((req, hit, n))
            budget -= n
        return rows
