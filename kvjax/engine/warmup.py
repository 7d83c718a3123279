"""The engine's warmup (split out of engine.py, no behaviour change): every (batch, chunk, table
width) step shape and the usual samplers compiled ahead of time, the first few now and the rest on
a background thread."""

from __future__ import annotations

import logging
import threading
import time

from kvjax import sampling
from kvjax.engine.pool import BATCH_BUCKETS, DECODE_BUCKETS, _bucket
from kvjax.engine.step import compile_sampler, enable_compile_cache
from kvjax.runner import CHUNK_BUCKETS, map_count

log = logging.getLogger("kvjax.engine")
# The warmup stops compiling once the process holds this share of its memory-mapping limit: past
# the limit LLVM's JIT cannot map code and the process dies (SIGSEGV), which a turbo3.5 SmolLM2
# server reached at ~80 executables of its 128-shape warmup. The rest compile when first used.
MAP_SHARE = 0.6


class WarmupMixin:
    """Methods of `Engine` (kvjax/engine/engine.py) that compile its step shapes."""

    def warmup_shapes(self, max_batch: int | None = None) -> list[tuple[int, int]]:
        """(batch, chunk) shapes the scheduler can produce: decode rows [B, 1] for each decode
        bucket up to max_num_seqs, and prefill rows [B, T] for each chunk bucket T and the batch
        buckets whose rows (2+ tokens each) fit the step's token budget."""
        ecfg = self.ecfg
        n_max = max_batch or ecfg.max_num_seqs
        shapes = [(b, 1) for b in DECODE_BUCKETS if b <= _bucket(n_max, DECODE_BUCKETS)]
        prev = 1
        for t in CHUNK_BUCKETS:
            if 1 < t <= _bucket(ecfg.chunk_size, CHUNK_BUCKETS):
                for b in BATCH_BUCKETS:
                    # Rows in this group are longer than the previous bucket; the fewest rows
                    # that pad to b are b//2 + 1: does such a group fit the token budget?
                    rows = 1 if b == 1 else b // 2 + 1
                    if rows <= n_max and rows * (prev + 1) <= ecfg.max_num_batched_tokens:
                        shapes.append((b, t))
                prev = t
        return shapes

    def warmup(self, max_batch: int | None = None, background: bool = True,
               max_len: int | None = None) -> float:
        """Compile (without running) every step shape: the (batch, chunk) shapes of
        `warmup_shapes` x the page-table widths up to max_len tokens (max_model_len), and the
        greedy sampler per batch bucket. One-row decode and prefill shapes at the narrowest
        width compile now; with background=True the others compile on a thread while the engine
        already serves (a step that needs one first compiles it itself), else now. Compiles go
        through JAX's persistent cache (`enable_compile_cache`), so a restart mostly loads them.
        Returns the seconds spent here; `warmup_done` is set when every shape is compiled."""
        t0 = time.perf_counter()
        enable_compile_cache()
        shapes = self.warmup_shapes(max_batch)
        jobs = []
        for pool in self.pools.values():
            r = pool.runner
            for i, w in enumerate(r.widths(max_len)):
                jobs += [(i, r, b, t, w) for b, t in shapes]
        # Now: one request's shapes at the narrowest width (decode and each prefill chunk),
        # so the server answers at once; the rest by width, narrowest first, decode first.
        first = [j for j in jobs if j[0] == 0 and j[2] == 1]
        rest = sorted((j for j in jobs if j not in first), key=lambda j: (j[0], j[3], j[2]))
        for _, r, b, t, w in first:
            r.compile(b, t, w)
        vocab = self.cfg.model.vocab_size
        for pool in self.pools.values():
            compile_sampler(pool.runner, 1, sampling.SamplerFlags(), vocab)
        spent = time.perf_counter() - t0
        log.info("warmup: compiled %d step shapes in %.1f s%s", len(first), spent,
                 f"; {len(rest)} wider ones compile in the background" if rest and background
                 else "")

        def compile_rest() -> None:
            t1 = time.perf_counter()
            for b in sorted({b for b, _ in shapes}):  # greedy, then the usual client knobs
                for flags in (sampling.SamplerFlags(), sampling.SamplerFlags(stochastic=True),
                              sampling.SamplerFlags(stochastic=True, truncate=True)):
                    for pool in self.pools.values():
                        compile_sampler(pool.runner, b, flags, vocab)
            for i, (_, r, b, t, w) in enumerate(rest):
                if self._stop:
                    return
                used, limit = map_count()
                if used > MAP_SHARE * limit:
                    log.warning("warmup: stopped after %d more step shapes in %.1f s: the process "
                                "holds %d of its %d memory mappings (vm.max_map_count; XLA:CPU "
                                "maps each executable's code, ~800 for a 30-layer turbo3.5 step); "
                                "the other %d shapes compile when first used", i,
                                time.perf_counter() - t1, used, limit, len(rest) - i)
                    break
                r.compile(b, t, w)
            else:
                log.info("warmup: %d more step shapes compiled in %.1f s", len(rest),
                         time.perf_counter() - t1)
            self.warmup_done.set()

        if background and rest:
            self._warmup_thread = threading.Thread(target=compile_rest, name="kvjax-warmup",
                                                   daemon=True)
            self._warmup_thread.start()
        else:
            compile_rest()
            spent = time.perf_counter() - t0
        return spent
