"""One model step as host arrays: run on device with the batch's sampling, and, in a multi-process
run, sent from process 0 (the scheduler) to every other process so all of them run the same
jitted programs on their shards.

A step is one forward over a padded batch (tokens [b, t], a page table [b, w] bucketed to what the
rows need, logits only at each row's `logits_index`) followed, when some row samples, by
`kvjax.sampling.sample_batch` on the logits still on device. What comes back to the host is the
sampled ids (and logprobs when asked): one transfer per step, whatever the vocabulary.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kvjax import sampling
from kvjax.runner import CHUNK_BUCKETS, Runner
from kvjax.sampling import SampleOutput, SamplerFlags, SamplingBatch

# Ahead-of-time compiled samplers: (mesh, batch, vocab, flags) -> executable (`compile_sampler`).
# The vocab is in the key: equal meshes of two engines (two models) in one process share the dict.
_SAMPLERS: dict[tuple, object] = {}


@dataclass
class StepBatch:
    """Host inputs of one step. Arrays: tokens, positions [b, t]; page_table [b, w]; lengths,
    slots (window ring slot), logits_index (the position whose logits are wanted) [b]."""
    pool: int
    tokens: np.ndarray
    positions: np.ndarray
    page_table: np.ndarray
    lengths: np.ndarray
    slots: np.ndarray
    logits_index: np.ndarray
    sample: SamplingBatch | None = None  # numpy fields; None: no row samples this step
    flags: SamplerFlags = SamplerFlags()
    fresh: np.ndarray | None = None  # [b] 1 where the row's window slot was just handed out
    # [b, w] absolute position of each page's first token, after an eviction (kvjax/engine/
    # eviction.py); None while no row of the step has evicted.
    page_pos: np.ndarray | None = None
    # The pool's cache accumulates H2O attention mass (a static switch of the program): the
    # other processes switch it on too, so every process runs the same program.
    mass: bool = False


def execute(runner: Runner, step: StepBatch) -> SampleOutput | None:
    """Run the forward and the sampler; the result stays on device (no sync here)."""
    logits = runner.run(step.tokens, step.positions, step.page_table, step.lengths, step.slots,
                        step.logits_index, step.page_pos)
    if step.sample is None:
        return None
    sb = step.sample
    if runner.mesh is not None:  # replicated global arrays, like the logits they meet
        rep = NamedSharding(runner.mesh, P())
        from kvjax.sharding import put_global

        sb = SamplingBatch(*(None if x is None else put_global(np.asarray(x), rep) for x in sb))
    exe = _SAMPLERS.get((runner.mesh, *logits.shape, step.flags))
    if exe is not None:
        return exe(logits, sb)
    return sampling.sample_batch_jit(logits, sb, flags=step.flags)


def fetch(out: SampleOutput, flags: SamplerFlags) -> tuple[np.ndarray, ...]:
    """The one device->host transfer of a step: ids, plus logprobs (and top-n) when asked."""
    if flags.top_n:
        return tuple(jax.device_get((out.tokens, out.logprobs, out.top_ids, out.top_logprobs)))
    if flags.logprobs:
        return tuple(jax.device_get((out.tokens, out.logprobs)))
    return (np.asarray(jax.device_get(out.tokens)),)


def prepare(runner: Runner, seq_ids: list[int], chunks: list[list[int]], batch: int | None = None,
            chunk: int | None = None) -> StepBatch:
    """A StepBatch appending chunks[i] to sequence seq_ids[i] over the runner's own allocator
    (generate and bench.decode; the engine builds its own from its block manager). The batch pads
    to `batch` rows and `chunk` columns (default: the chunk bucket); logits at each row's last
    token; no sampling until the caller sets it."""
    t = chunk or next((b for b in CHUNK_BUCKETS if b >= max(map(len, chunks))), 0)
    b = batch or len(seq_ids)
    tokens = np.zeros((b, t), np.int32)
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    lengths = np.zeros((b,), np.int32)
    logits_index = np.zeros((b,), np.int32)
    for row, (sid, c) in enumerate(zip(seq_ids, chunks, strict=True)):
        start = runner.lengths.get(sid, 0)
        if start + len(c) > runner.max_seq_len:
            raise ValueError(f"sequence {sid} would exceed {runner.max_seq_len} tokens")
        runner.allocator.ensure(sid, start + len(c))
        runner.lengths[sid] = start + len(c)
        tokens[row, :len(c)] = c
        positions[row] += start
        lengths[row] = start + len(c)
        logits_index[row] = len(c) - 1
    width = runner.table_width(int(lengths.max()))
    table = np.zeros((b, width), np.int32)
    table[:len(seq_ids)] = runner.allocator.page_table(seq_ids, width)
    slots = runner.slots_for([*seq_ids, *[None] * (b - len(seq_ids))])
    return StepBatch(0, tokens, positions, table, lengths, slots, logits_index)


def compile_sampler(runner: Runner, b: int, flags: sampling.SamplerFlags, vocab: int) -> None:
    """Compile the batch sampler for [b, vocab] logits and these flags, ahead of time."""
    sb, _ = sampling.pack([None] * b, b, [0] * b, [0] * b)
    sb = sampling.SamplingBatch(*(None if x is None else np.asarray(x) for x in sb))
    spec = {}
    if runner.mesh is not None:
        spec["sharding"] = jax.sharding.NamedSharding(runner.mesh, jax.sharding.PartitionSpec())

    def abstract(x):
        return None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, **spec)

    key = (runner.mesh, b, vocab, flags)
    if flags.penalties or flags.bias_width or flags.stop_width:
        return  # their arrays vary per batch: compiled by jit when first used
    if key not in _SAMPLERS:
        _SAMPLERS[key] = sampling.sample_batch_jit.lower(
            jax.ShapeDtypeStruct((b, vocab), jnp.float32, **spec),
            sampling.SamplingBatch(*(abstract(x) for x in sb)), flags=flags).compile()


def enable_compile_cache() -> str | None:
    """Point JAX's persistent compilation cache at $KVJAX_COMPILE_CACHE (default
    ~/.cache/kvjax/xla; "0" turns it off) unless the user configured one: a restart then loads the
    step executables instead of compiling them (measured on tiny_llama: 3.9 s -> 0.5 s a shape).
    Returns the directory in use."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = os.environ.get("KVJAX_COMPILE_CACHE", os.path.expanduser("~/.cache/kvjax/xla"))
    if path == "0":
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


@contextlib.contextmanager
def count_compiles():
    """`with count_compiles() as n:` ... `n()`: XLA compilations inside the block (the check that
    a warmed-up run never recompiles)."""
    from jax._src import dispatch, monitoring

    count = [0]

    def listener(event: str, duration: float, **_) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            count[0] += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield lambda: count[0]
    finally:
        monitoring.unregister_event_duration_listener(listener)


# ---- multi-process: process 0 sends each step, the others receive it ----------------------------
HEADER = 16
STOP, STEP = 0, 1
_SAMPLE_I32 = ("top_k", "seed", "step")
_SAMPLE_F32 = ("temperature", "top_p")


def _layout(h: np.ndarray, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(field, shape, 'i' | 'f') of every array a step carries, derived from its header."""
    b, t, w, has_sample = int(h[2]), int(h[3]), int(h[4]), bool(h[5])
    out = [("tokens", (b, t), "i"), ("positions", (b, t), "i"), ("page_table", (b, w), "i"),
           ("lengths", (b,), "i"), ("slots", (b,), "i"), ("logits_index", (b,), "i"),
           ("fresh", (b,), "i")]
    if h[13]:  # some row has evicted: positions (per page, or per slot) travel with the step
        out.append(("page_pos", (b, int(h[13])), "i"))
    if has_sample:
        f = _flags(h)
        out += [(k, (b,), "i") for k in _SAMPLE_I32] + [(k, (b,), "f") for k in _SAMPLE_F32]
        if f.penalties:
            out += [(k, (b,), "f") for k in ("presence", "frequency", "repetition")]
            out += [("output_counts", (b, vocab), "i"), ("prompt_mask", (b, vocab), "i")]
        if f.bias_width:
            out += [("bias_ids", (b, f.bias_width), "i"), ("bias_values", (b, f.bias_width), "f")]
        if f.stop_width:
            out += [("stop_ids", (b, f.stop_width), "i")]
    return out


def _flags(h: np.ndarray) -> SamplerFlags:
    return SamplerFlags(bool(h[6]), bool(h[7]), bool(h[8]), int(h[9]), int(h[10]), bool(h[11]),
                        int(h[12]))


def _header(step: StepBatch) -> np.ndarray:
    h = np.zeros(HEADER, np.int32)
    b, t = step.tokens.shape
    f = step.flags
    h[:13] = [STEP, step.pool, b, t, step.page_table.shape[1], step.sample is not None,
              f.stochastic, f.truncate, f.penalties, f.bias_width, f.stop_width, f.logprobs,
              f.top_n]
    h[13] = 0 if step.page_pos is None else step.page_pos.shape[1]
    h[14] = step.mass
    return h


def _pad(n: int) -> int:
    """Payload sizes round up to powers of two: the broadcast compiles once per size."""
    return 1 << max(n - 1, 0).bit_length()


def _broadcast(tree):
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


class Channel:
    """Process 0 `send`s every step (and finally `stop`); the others loop on `recv`. Every call
    is a collective over all processes, so they must alternate exactly, which the follower loop
    guarantees: it runs the same `execute` on what it received."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.active = jax.process_count() > 1

    def send(self, step: StepBatch) -> None:
        if not self.active:
            return
        h = _header(step)
        _broadcast(h)
        fields = {**vars(step), **({} if step.sample is None else step.sample._asdict())}
        if step.fresh is None:
            fields["fresh"] = np.zeros(step.lengths.shape, np.int32)
        ints, floats = [], []
        for name, _, kind in _layout(h, self.vocab):
            x = np.asarray(fields[name])
            if kind == "i":
                ints.append(x.astype(np.uint32).view(np.int32) if x.dtype == np.uint32
                            else x.astype(np.int32))
            else:
                floats.append(x.astype(np.float32))
        _broadcast(self._payload(ints, floats))

    def stop(self) -> None:
        if self.active:
            _broadcast(np.zeros(HEADER, np.int32))

    def _payload(self, ints: list, floats: list) -> tuple[np.ndarray, np.ndarray]:
        i = np.concatenate([x.ravel() for x in ints]) if ints else np.zeros(0, np.int32)
        f = np.concatenate([x.ravel() for x in floats]) if floats else np.zeros(0, np.float32)
        return (np.pad(i, (0, _pad(i.size) - i.size)), np.pad(f, (0, _pad(f.size) - f.size)))

    def recv(self) -> StepBatch | None:
        """The next step from process 0, or None when it stopped."""
        h = np.asarray(_broadcast(np.zeros(HEADER, np.int32)))
        if int(h[0]) == STOP:
            return None
        layout = _layout(h, self.vocab)
        ni = sum(int(np.prod(s)) for _, s, k in layout if k == "i")
        nf = sum(int(np.prod(s)) for _, s, k in layout if k == "f")
        ints, floats = _broadcast((np.zeros(_pad(ni), np.int32), np.zeros(_pad(nf), np.float32)))
        ints, floats = np.asarray(ints), np.asarray(floats)
        got, oi, of = {}, 0, 0
        for name, shape, kind in layout:
            n = int(np.prod(shape))
            if kind == "i":
                got[name] = ints[oi:oi + n].reshape(shape)
                oi += n
            else:
                got[name] = floats[of:of + n].reshape(shape)
                of += n
        sample = None
        if bool(h[5]):
            got["seed"] = got["seed"].view(np.uint32)
            if "prompt_mask" in got:
                got["prompt_mask"] = got["prompt_mask"].astype(bool)
            sample = SamplingBatch(**{k: got.get(k) for k in SamplingBatch._fields})
        return StepBatch(int(h[1]), got["tokens"], got["positions"], got["page_table"],
                         got["lengths"], got["slots"], got["logits_index"], sample, _flags(h),
                         got["fresh"], got.get("page_pos"), bool(h[14]))
