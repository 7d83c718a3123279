"""Runs a model over the paged cache: builds it from a config, owns the page pool and allocator,
and feeds chunks of tokens for a batch of sequences. generate, eval and the benchmarks share it.

Chunks are padded to a few bucket lengths so the jitted forward compiles a handful of times, not
once per prompt length.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import itertools
import logging
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from kvjax import sharding
from kvjax.cache import BlockManager, bytes_per_token, init_cache, window_bytes_per_sequence
from kvjax.cache.paged import reset_window_slot, with_attention_mass
from kvjax.config import Config
from kvjax.pool_formats import pin, pinned_forward, pool_formats
from kvjax.quant import weights

# Chunk lengths a forward pads to. The 32 and 128 rungs keep the engine's budget-cut pieces and a
# request's last piece (a 256-token prompt cut 64 + 192, 128 + 128, 32-token prompts) from padding
# up to 2x: at concurrency 32 the old (1, 16, 64, 256) computed 1.23x the real prefill tokens.
CHUNK_BUCKETS = (1, 16, 32, 64, 128, 256)
# XLA:CPU maps each executable's JIT code (~126 mappings for a 30-layer SmolLM2 step with a bf16
# cache, ~800 with turbo3.5); past vm.max_map_count LLVM cannot map new code and the process dies
# (SIGSEGV). Above this share of the limit `Runner.compile` first drops the least recently used
# quarter of its executables (a later step recompiles one, mostly a load from JAX's persistent
# cache). The engine's warmup stops earlier, at 0.6 (kvjax/engine/warmup.py).
EVICT_SHARE = 0.8
log = logging.getLogger("kvjax.runner")


def map_count() -> tuple[int, int]:
    """(memory mappings this process holds, vm.max_map_count); (0, 1) where Linux's /proc
    files are not there."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f), limit
    except (OSError, ValueError):
        return 0, 1


def _drop_jax_caches() -> None:
    """JAX's staging caches also hold compiled executables: an executable's code is unmapped
    only once they are cleared too (measured: 8 compiles +740 mappings; dropping 4 of them frees
    ~370 only after this). The C++ dispatch caches of other jitted functions are kept."""
    try:
        from jax._src import util as jax_util

        jax_util.clear_all_caches()
    except (ImportError, AttributeError):  # a JAX without it: the public, coarser call
        jax.clear_caches()
    gc.collect()


def _null() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def param_dtype(cfg: Config) -> jnp.dtype:
    """f32 on CPU (XLA's CPU backend is slow at bf16 matmuls, DESIGN.md) unless the f32 weights
    would not fit comfortably (the 70B-shaped smoke run); the config's dtype elsewhere."""
    if cfg.param_dtype == "f32":
        return jnp.float32
    if jax.default_backend() == "cpu" and cfg.model.num_params() * 4 < 8 * 2**30:
        return jnp.float32
    return jnp.bfloat16


def compiler_options(dtype) -> dict[str, str]:
    """XLA options for the forward with weights in `dtype`. bf16 weights on the CPU backend
    (f32 compute): XLA:CPU's bf16 float normalization rewrites each bf16 dynamic-slice of the
    stacked layer weights as slice(convert-to-f32(whole stack)), and loop-invariant code motion
    then materialises that f32 copy of every layer's weights (2x their bytes, per device) before
    the layer loop. The forward's bf16 ops are data movement, converts and dots with f32
    accumulation, which the backend runs natively, so the pass is off for those programs (a
    70B-shaped layer on tensor 8: 0.43 GB of temporaries per device -> one bf16 slice)."""
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.bfloat16:
        return {"xla_disable_hlo_passes": "float-normalization-bf16"}
    return {}


def _ladder():
    """Table widths in pages: 8, 12, 16, 24, 32, 48, ... (at most 1.5x the pages a step needs,
    where powers of two alone waste up to 2x; twice the compiled widths)."""
    w = 8
    while True:
        yield w
        yield w * 3 // 2
        w *= 2


class Runner:
    def __init__(self, cfg: Config, params: dict, max_seq_len: int, max_batch: int = 1,
                 mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        mc = cfg.model
        dtype = param_dtype(cfg)
        if mesh is None:
            # Projections quantized to mc.weight_dtype (kvjax/quant/weights.py), rest cast.
            params = weights.prepare(params, mc, dtype)
        else:  # tensor/data parallel (kvjax/sharding.py): each device gets only its shards
            if mc.weight_dtype != "auto":
                raise ValueError(f"--weight-dtype {mc.weight_dtype} runs on one device; sharding "
                                 "quantized weights is not supported yet")
            params = sharding.shard_params(params, mc, mesh, dtype)
        self.graphdef, self.params = nnx.split(
            models.Transformer(mc, params, attention_impl=cfg.resolved_attention_impl()))
        self.compiler_options = compiler_options(dtype)
        page_size = cfg.cache.page_size
        self.max_seq_len = max_seq_len
        self.max_pages = math.ceil(max_seq_len / page_size)
        num_pages = cfg.cache.num_pages or max_batch * self.max_pages + 1
        # On TPU the cache is marked as stored in the pinned layouts below (`pin`): the kernels
        # then take the pool leaves the layer loop carries in them whole, with no per-layer copy.
        self.mesh = mesh
        self._device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
        self._init_cache = lambda: pin(init_cache(mc, cfg.cache, num_pages, num_slots=max_batch),
                                       self._device.platform)
        # On TPU the pool lives in the layout the step's layer loop and kernels use, pinned as
        # every step's cache output (kvjax/pool_formats.py: else each step relayouts the whole
        # pool in and out); None elsewhere, where the default layout is that one already.
        self._formats = self._cache_formats(jax.eval_shape(self._init_cache))
        self._cache = self._new_cache()
        self._set_forward()
        self.allocator = BlockManager(num_pages, page_size)  # prefix caching off: a free list
        # (batch, t, width) -> executable, least recently used first (see EVICT_SHARE)
        self._compiled: collections.OrderedDict[tuple[int, int, int], object] = \
            collections.OrderedDict()
        self._compiled_lock = threading.Lock()  # the engine's warmup thread compiles too
        self.evicted = 0  # executables dropped near the memory-mapping limit
        self.lengths: dict[int, int] = {}  # sequence id -> tokens in the cache
        # Ring-buffer slots of the full-precision window, one per running sequence.
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self.window_slot: dict[int, int] = {}

    @property
    def cache(self):
        return self._cache

    @cache.setter
    def cache(self, cache) -> None:
        """A cache made outside the step jits (eviction's compaction) is placed in the pinned
        layouts (a copy on TPU only if it is not in them already; as is elsewhere)."""
        self._cache = cache if self._formats is None else jax.device_put(cache, self._formats)

    def _cache_formats(self, cache):
        """Per-leaf formats of the cache on this runner's devices (`pool_formats`)."""
        dev = self._device
        if self.mesh is None:
            shards = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(dev), cache)
        elif isinstance(jax.tree.leaves(cache)[0], jax.Array):  # placed: keep where it is
            shards = jax.tree.map(lambda a: a.sharding, cache)  # (H2O mass: replicated)
        else:
            shards = sharding.cache_shardings(cache, self.cfg.model, self.mesh)
        return pool_formats(cache, shards, dev.platform)

    def _new_cache(self):
        if self._formats is None:
            return sharding.init_sharded(self._init_cache, self.cfg.model, self.mesh)
        return jax.jit(self._init_cache, out_shardings=self._formats)()

    def _set_forward(self) -> None:
        """The step jit (and, with pinned formats, the slot reset) for the cache's structure."""
        if self._formats is not None:
            self.forward = pinned_forward(self.mesh, self._formats)
            self._reset_slot = jax.jit(reset_window_slot.__wrapped__, donate_argnums=0,
                                       out_shardings=self._formats)
            return
        self._reset_slot = reset_window_slot
        self.forward = (models.forward if self.mesh is None
                        else sharding.sharded_forward(self.mesh, self._cache))

    @property
    def kv_bytes_per_token(self) -> float:
        """Page bytes per token over all layers, K and V, metadata included."""
        return bytes_per_token(self.cfg.model, self.cfg.cache)

    def kv_bytes_in_use(self) -> int:
        """Bytes the running sequences hold now: whole pages (that is what they occupy) plus
        their full-precision windows."""
        pages = self.allocator.num_used * self.cfg.cache.page_size * self.kv_bytes_per_token
        return int(pages + len(self.window_slot) * window_bytes_per_sequence(self.cfg.model,
                                                                            self.cfg.cache))

    def _slot(self, seq_id: int) -> int:
        if seq_id not in self.window_slot:
            if not self._free_slots:
                raise ValueError(f"more than {len(self.window_slot)} sequences at once")
            self.window_slot[seq_id] = slot = self._free_slots.pop()
            self.untag_slot(slot)
        return self.window_slot[seq_id]

    def untag_slot(self, slot: int) -> None:
        """The slot's ring still holds its previous occupant's K/V: untag it, so the sequence
        taking it reads only ring entries it writes (kvjax/cache/paged.py). The engine's other
        processes call it for the slots process 0 hands out (StepBatch.fresh)."""
        if window_bytes_per_sequence(self.cfg.model, self.cfg.cache):
            self._cache = self._reset_slot(self._cache, jnp.int32(slot))

    def step(self, seq_ids: list[int], chunks: list[list[int]]) -> jax.Array:
        """Append `chunks[i]` to sequence `seq_ids[i]`; returns logits [batch, chunk_len, vocab]
        (rows past a sequence's own chunk are padding)."""
        longest = max(len(c) for c in chunks)
        t = next((b for b in CHUNK_BUCKETS if b >= longest), longest)
        batch = len(seq_ids)
        tokens = np.zeros((batch, t), np.int32)
        positions = np.zeros((batch, t), np.int32)
        lengths = np.zeros((batch,), np.int32)
        slots = np.array([self._slot(sid) for sid in seq_ids], np.int32)
        for row, (sid, chunk) in enumerate(zip(seq_ids, chunks, strict=True)):
            start = self.lengths.get(sid, 0)
            if start + len(chunk) > self.max_seq_len:
                raise ValueError(f"sequence {sid} would exceed {self.max_seq_len} tokens")
            self.allocator.ensure(sid, start + len(chunk))
            tokens[row, : len(chunk)] = chunk
            positions[row] = start + np.arange(t)
            lengths[row] = start + len(chunk)
            self.lengths[sid] = start + len(chunk)
        page_table = self.allocator.page_table(seq_ids, self._table_width(int(lengths.max())))
        logits, self._cache = self.forward(
            self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(positions), self._cache,
            jnp.asarray(page_table), jnp.asarray(lengths), jnp.asarray(slots))
        return logits

    def _table_width(self, longest: int) -> int:
        """Page-table columns for a step whose longest sequence holds `longest` tokens: the next
        rung of the ladder 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5x them) at or above
        the pages it needs, capped at max_pages. Attention reads every column, so a 1K prompt in
        an 8K runner costs 1K of attention, not 8K, and a row just past a power of two (544
        tokens) reads 48 pages, not 64; one compile per width."""
        need = max(1, math.ceil(longest / self.cfg.cache.page_size))
        return min(self.max_pages, next(w for w in _ladder() if w >= need))

    table_width = _table_width

    def widths(self, longest: int | None = None) -> list[int]:
        """Every table width `table_width` can return for sequences up to `longest` tokens (all
        of max_seq_len by default): the bounded set a warmup compiles."""
        top = self._table_width(self.max_seq_len if longest is None else longest)
        return [*itertools.takewhile(lambda w: w < top, _ladder()), top]

    def slots_for(self, seq_ids: list[int | None]) -> np.ndarray:
        """[batch] window ring slot per row (0 for padding rows), assigned on first use."""
        return np.array([0 if s is None else self._slot(s) for s in seq_ids], np.int32)

    def track_attention_mass(self) -> None:
        """Accumulate H2O's per-token attention mass in the cache from now on (a static switch:
        steps take the XLA attention path; the ahead-of-time executables, compiled for the cache
        without it, are dropped and jit compiles the new shapes)."""
        if self.tracks_attention_mass:
            return
        if self.mesh is None:
            self._cache = with_attention_mass(self._cache)
        else:  # replicated on every device (each process reads its own replica), and the
            # forward's pinned output shardings rebuilt for the cache's new structure
            rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            self._cache = with_attention_mass(self._cache, lambda shape, dtype: jax.jit(
                lambda: jnp.zeros(shape, dtype), out_shardings=rep)())
        if self.mesh is not None or self._formats is not None:
            self._formats = self._cache_formats(self._cache)
            self._set_forward()
        self._compiled.clear()

    @property
    def tracks_attention_mass(self) -> bool:
        return all(seg.mass is not None for seg in self.cache.segments)

    def run(self, tokens: np.ndarray, positions: np.ndarray, page_table: np.ndarray,
            lengths: np.ndarray, slots: np.ndarray, logits_index: np.ndarray,
            page_pos: np.ndarray | None = None) -> jax.Array:
        """One forward of a prepared batch (tokens, positions: [batch, t]; page_table: [batch,
        width]; lengths, slots, logits_index: [batch]) -> logits [batch, vocab] at each row's
        `logits_index`, left on device. The cache is updated in place. The engine and generate
        both step through here (with `compile` warming the shapes first)."""
        key = (*tokens.shape, page_table.shape[1])
        if key not in self._compiled and page_pos is None:  # not warmed up: compile it now
            self.compile(*key)
        with self._compiled_lock:
            exe = self._compiled.get(key)
            if exe is not None:
                self._compiled.move_to_end(key)
        if exe is None or page_pos is not None:
            logits, self._cache = self.forward(
                self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(positions),
                self._cache, jnp.asarray(page_table), jnp.asarray(lengths), jnp.asarray(slots),
                jnp.asarray(logits_index), None if page_pos is None else jnp.asarray(page_pos))
            return logits
        # device_put, not jnp.asarray: jax 0.10's asarray stages numpy through a jit that
        # compiles once per shape, which a warmed-up engine must not do.
        put = jax.device_put if self.mesh is None else functools.partial(sharding.put_batch,
                                                                         self.mesh)
        logits, self._cache = exe(self.params, put(tokens), put(positions), self._cache,
                                 put(page_table), put(lengths), put(slots), put(logits_index))
        return logits

    def compile(self, batch: int, t: int, width: int) -> None:
        """Compile `run` for one (batch, chunk, table width) shape ahead of time, without
        executing it. jit's own call cache does not see ahead-of-time compiles, so `run` looks
        them up in `_compiled`. Each process of a mesh compiles its own; no collectives."""
        # Inputs placed exactly as `run` places them (the executable checks their shardings).
        if self.mesh is None:
            def spec(*shape):
                return jnp.zeros(shape, jnp.int32)
        else:
            def spec(*shape):
                return sharding.put_batch(self.mesh, np.zeros(shape, np.int32))
        jitted = getattr(self.forward, "jitted", self.forward)
        if (batch, t, width) in self._compiled:
            return
        self._make_room()
        with sharding.tracing_mesh(self.mesh) if self.mesh is not None else _null():
            exe = jitted.lower(
                self.graphdef, self.params, spec(batch, t), spec(batch, t), self.cache,
                spec(batch, width), spec(batch), spec(batch), spec(batch)).compile(
                    self.compiler_options or None)
        with self._compiled_lock:
            self._compiled[batch, t, width] = exe

    def _make_room(self) -> None:
        """Near the process's memory-mapping limit, drop the least recently used quarter of the
        executables (at least one) before compiling another: a long-running server that meets
        many shapes recompiles some instead of dying when LLVM cannot map code."""
        used, limit = map_count()
        if used <= EVICT_SHARE * limit or not self._compiled:
            return
        with self._compiled_lock:
            n = max(1, len(self._compiled) // 4)
            for _ in range(n):
                self._compiled.popitem(last=False)
        self.evicted += n
        _drop_jax_caches()
        log.warning("%d of %d memory mappings in use (vm.max_map_count): dropped the %d least "
                    "recently used step executables (%d kept); they recompile when next used",
                    used, limit, n, len(self._compiled))

    def forward_batch(self, seq_ids: list[int | None], tokens: np.ndarray, positions: np.ndarray,
                      page_table: np.ndarray, lengths: np.ndarray,
                      page_pos: np.ndarray | None = None) -> jax.Array:
        """One forward over a page table managed outside the runner (the serving engine's block
        manager, kvjax/engine). Row i is sequence `seq_ids[i]` (None: a padding row, length 0);
        tokens, positions: [batch, t]; page_table: [batch, max_pages]; lengths: [batch]. The
        runner's per-sequence state (window slots) is keyed by sequence id; `free` releases it.
        Returns logits [batch, t, vocab]; the cache is updated in place."""
        slots = np.array([0 if s is None else self._slot(s) for s in seq_ids], np.int32)
        logits, self._cache = self.forward(
            self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(positions), self._cache,
            jnp.asarray(page_table), jnp.asarray(lengths), jnp.asarray(slots), None,
            None if page_pos is None else jnp.asarray(page_pos))
        return logits

    def warmup(self, chunk_lens: tuple[int, ...] = CHUNK_BUCKETS, batch: int = 1) -> None:
        """Compile the forward for these chunk lengths now, so timings exclude compilation.
        Runs on zero-length sequences: every write lands in the null page."""
        for t in chunk_lens:
            zeros = jnp.zeros((batch, t), jnp.int32)
            logits, self._cache = self.forward(
                self.graphdef, self.params, zeros, zeros, self._cache,
                jnp.zeros((batch, self.max_pages), jnp.int32), jnp.zeros((batch,), jnp.int32),
                jnp.zeros((batch,), jnp.int32))
        logits.block_until_ready()

    def prefill(self, seq_id: int, ids: list[int], chunk: int = CHUNK_BUCKETS[-1]) -> jax.Array:
        """Writes a prompt in chunks; returns the logits [vocab] after its last token."""
        logits = None
        for i in range(0, len(ids), chunk):
            piece = ids[i: i + chunk]
            logits = self.step([seq_id], [piece])[0, len(piece) - 1]
        return logits

    def reset_cache(self) -> None:
        """A fresh, empty cache (after a failed step consumed the donated one)."""
        self._formats = self._cache_formats(jax.eval_shape(self._init_cache))
        self._cache = self._new_cache()
        if self.mesh is not None or self._formats is not None:  # its structure may differ
            self._set_forward()  # (no attention mass)

    def free(self, seq_id: int) -> None:
        self.allocator.free(seq_id)
        self.lengths.pop(seq_id, None)
        if seq_id in self.window_slot:
            self._free_slots.append(self.window_slot.pop(seq_id))
