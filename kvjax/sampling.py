"""Next-token sampling for a whole batch inside a jitted step (API: /work/notes/sampling_api.md).

`sample_batch(logits [B, V], batch: SamplingBatch, flags: SamplerFlags)` returns the token id of
every row, its log-probability and, when asked, the top-N log-probabilities. Every per-request
knob is a per-row array (temperature, top_k, top_p, seed, penalties, logit_bias, min_tokens), so a
new value never recompiles; `SamplerFlags` is the only static part and switches off, at trace
time, the work no row of the batch needs (top-k/top-p, penalties, bias, min_tokens, logprobs).
`pack` builds both from per-row parameters on the host.

Order (vLLM's v1 sampler): raw logprobs from the model's logits -> min_tokens (stop ids to -inf)
-> logit_bias -> repetition, frequency and presence penalties -> greedy argmax for temperature 0
rows -> temperature -> top-k (ties at the k-th value kept, as vLLM) -> top-p -> one draw.
Penalties follow the OpenAI reference (`mu[j] - c[j] * frequency - (c[j] > 0) * presence`, c
counting generated tokens) and vLLM's repetition penalty (HF/CTRL: a logit of a prompt or
generated token is divided by r if > 0, else multiplied by r). Top-k and top-p find their
thresholds by bisection over the float bits (no sort: XLA's CPU sort of [32, 49152] takes seconds).

Draws: one uniform per row from `fold_in(key(seed), step)`, where `step` is how many tokens the
request generated before, then inverse-CDF selection. The draw depends only on the row's own seed,
step and logits, never on the batch around it or the device count, so a seeded request is
reproducible under any batching and on any mesh. One uniform per row (rather than a Gumbel per
vocab entry) keeps the random bits at B numbers per step, which matters on CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = float("-inf")
TOP_LOGPROBS_MAX = 20  # OpenAI's bound on top_logprobs; the static width of the top-N output
WIDTH_BUCKETS = (8, 32, 128, 512, 2048)  # static widths of logit_bias / stop-id arrays
CANDIDATES = 256  # top values the top-k / top-p fast path looks at (else: exact bisection)


class SamplerFlags(NamedTuple):
    """Static switches (hashable; a jit static argument). Each False skips its work entirely."""
    stochastic: bool = False  # some row has temperature > 0
    truncate: bool = False  # some stochastic row has top_k > 0 or top_p < 1: ~62 passes over
    # [B, V] (bisection for the top-k value and the nucleus threshold; no sort)
    penalties: bool = False  # some row has a presence/frequency/repetition penalty
    bias_width: int = 0  # columns of bias_ids / bias_values (0 = no logit_bias in the batch)
    stop_width: int = 0  # columns of stop_ids (0 = no row still below its min_tokens)
    logprobs: bool = False  # return the sampled token's logprob (else logprobs are zeros)
    top_n: int = 0  # return the top top_n logprobs per row (0 = none)


class SamplingBatch(NamedTuple):
    """Per-row sampling inputs; arrays for switched-off features may be None."""
    temperature: jax.Array  # f32[B]; 0 = greedy
    top_k: jax.Array  # i32[B]; <= 0 = off
    top_p: jax.Array  # f32[B]; 1 = off
    seed: jax.Array  # u32[B]; the row's own seed
    step: jax.Array  # i32[B]; tokens the row generated before this one (the draw's counter)
    presence: jax.Array | None = None  # f32[B]
    frequency: jax.Array | None = None  # f32[B]
    repetition: jax.Array | None = None  # f32[B]; 1 = off
    output_counts: jax.Array | None = None  # i32[B, V]: times each token was generated
    prompt_mask: jax.Array | None = None  # bool[B, V]: token occurs in the prompt
    bias_ids: jax.Array | None = None  # i32[B, bias_width]; -1 = padding
    bias_values: jax.Array | None = None  # f32[B, bias_width]
    stop_ids: jax.Array | None = None  # i32[B, stop_width]; -1 = padding: banned this step


class SampleOutput(NamedTuple):
    tokens: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B]: log p(token) under the model's raw distribution
    top_ids: jax.Array  # i32[B, top_n]
    top_logprobs: jax.Array  # f32[B, top_n]


def _scatter_rows(x: jax.Array, ids: jax.Array, values: jax.Array, op: str) -> jax.Array:
    """x[b, ids[b, j]] op= values[b, j]; ids < 0 are padding (dropped)."""
    b, v = x.shape
    ids = jnp.where(ids < 0, v, ids)  # out of range: mode="drop" discards it
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
    ref = x.at[rows, ids]
    return (ref.add(values, mode="drop") if op == "add" else ref.set(values, mode="drop"))


def process_logits(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> jax.Array:
    """[B, V] f32 -> the logits after min_tokens, logit_bias and penalties (before temperature)."""
    x = logits.astype(jnp.float32)
    if flags.stop_width:
        x = _scatter_rows(x, batch.stop_ids, jnp.full(batch.stop_ids.shape, NEG_INF), "set")
    if flags.bias_width:
        x = _scatter_rows(x, batch.bias_ids, batch.bias_values.astype(jnp.float32), "add")
    if flags.penalties:
        counts = batch.output_counts
        seen = (counts > 0) | batch.prompt_mask
        r = batch.repetition[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
        x = x - counts.astype(jnp.float32) * batch.frequency[:, None]
        x = x - (counts > 0).astype(jnp.float32) * batch.presence[:, None]
    return x


def row_uniforms(seed: jax.Array, step: jax.Array) -> jax.Array:
    """u32[B], i32[B] -> f32[B] in (0, 1]: each row's draw, a function of its seed and step only."""
    def one(s, t):
        return 1.0 - jax.random.uniform(jax.random.fold_in(jax.random.key(s), t))
    return jax.vmap(one)(seed, step)


def _inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """First index whose cumulative probability reaches u * total (a zero-probability entry is
    never chosen because u > 0)."""
    cum = jnp.cumsum(probs, axis=-1)
    target = u[:, None] * cum[:, -1:]
    idx = jnp.sum(cum < target, axis=-1)
    return jnp.minimum(idx, probs.shape[-1] - 1).astype(jnp.int32)


def _sortable(x: jax.Array) -> jax.Array:
    """f32 -> u32 with the same order (the radix-sort key: flip negatives, set the sign bit of
    non-negatives)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_largest_key(keys: jax.Array, k: jax.Array) -> jax.Array:
    """u32[B, V], i32[B] -> u32[B]: the largest m with #(keys >= m) >= k, by bisection over the
    32-bit key space (32 counting passes; no sort: XLA's CPU sort of [B, V] costs seconds)."""
    lo = jnp.zeros(keys.shape[:1], jnp.uint32)
    hi = jnp.full(keys.shape[:1], 0xFFFFFFFF, jnp.uint32)

    def body(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(keys >= mid[:, None], axis=-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def _nucleus_threshold(probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """f32[B, V] -> i32[B] bits of the largest probability q with mass(p >= q) >= top_p, by
    bisection over the bits of non-negative floats (ordered like ints; 1.0 = 0x3F800000)."""
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    lo = jnp.zeros(probs.shape[:1], jnp.int32)
    hi = jnp.full(probs.shape[:1], 0x3F800001, jnp.int32)

    def body(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, 30, body, (lo, hi))[0]


def _draw(x: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> jax.Array:
    b, v = x.shape
    t = jnp.maximum(batch.temperature, 1e-6)[:, None]
    scaled = x / t
    u = row_uniforms(batch.seed, batch.step)
    # Every row draws over the vocabulary in id order (truncation only zeroes entries), so a
    # row's token never depends on its neighbours' settings.
    plain = _inverse_cdf(jax.nn.softmax(scaled, axis=-1), u)
    if not flags.truncate:
        return plain
    # Top-k as vLLM: keep every logit >= the k-th largest (ties at the k-th value stay).
    # Fast path: the thresholds from the top CANDIDATES values (lax.top_k, a partial sort), exact
    # whenever every row's top_k and nucleus fall inside them (peaked distributions: the usual
    # case). Otherwise the whole batch takes the exact bisection path: a runtime branch, not a
    # static flag, so every process of a multi-host run compiles the same program.
    k = jnp.where(batch.top_k > 0, jnp.minimum(batch.top_k, v), v)
    c = min(CANDIDATES, v)
    vals, idx = jax.lax.top_k(scaled, c)  # [B, c] descending
    kth = jnp.take_along_axis(vals, jnp.minimum(k, c)[:, None] - 1, axis=-1)
    kept_fast = jnp.where((k[:, None] < v) & (scaled < kth), NEG_INF, scaled)
    probs_fast = jax.nn.softmax(kept_fast, axis=-1)
    cand = jnp.take_along_axis(probs_fast, idx, axis=-1)  # the same floats the mask compares
    cum = jnp.cumsum(cand, axis=-1)
    enough = cum[:, -1] >= batch.top_p
    # q: the candidate probability at which the cumulative mass first reaches top_p.
    first = jnp.minimum(jnp.sum(cum < batch.top_p[:, None], axis=-1), c - 1)
    q_fast = jnp.take_along_axis(cand, first[:, None], axis=-1)
    fast_ok = jnp.all(((k <= c) | (k == v)) & (enough | (batch.top_p >= 1)))

    def fast(_):
        keep = (probs_fast >= q_fast) | (batch.top_p[:, None] >= 1)
        return jnp.where(keep, probs_fast, 0.0)

    def exact(_):
        keys = _sortable(scaled)
        kept = jnp.where(keys >= _kth_largest_key(keys, k)[:, None], scaled, NEG_INF)
        p = jax.nn.softmax(kept, axis=-1)
        q = _nucleus_threshold(p, batch.top_p)
        keep = jax.lax.bitcast_convert_type(p, jnp.int32) >= q[:, None]
        return jnp.where(keep | (batch.top_p[:, None] >= 1), p, 0.0)

    probs = jax.lax.cond(fast_ok, fast, exact, None)
    return jnp.where((k < v) | (batch.top_p < 1), _inverse_cdf(probs, u), plain)


def sample_batch(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> SampleOutput:
    """logits [B, V] -> SampleOutput. Call inside a jit with `flags` static (or use
    `sample_batch_jit`)."""
    b = logits.shape[0]
    x = process_logits(logits, batch, flags)
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if flags.stochastic:
        tokens = jnp.where(batch.temperature > 0, _draw(x, batch, flags), tokens)
    lp = jnp.zeros((b,), jnp.float32)
    top_ids = jnp.zeros((b, flags.top_n), jnp.int32)
    top_lp = jnp.zeros((b, flags.top_n), jnp.float32)
    if flags.logprobs or flags.top_n:
        raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lp = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
        if flags.top_n:
            top_lp, top_ids = jax.lax.top_k(raw, flags.top_n)
    return SampleOutput(tokens, lp, top_ids.astype(jnp.int32), top_lp)


sample_batch_jit = jax.jit(sample_batch, static_argnames=("flags",))


# ---- penalty state -------------------------------------------------------------------------------
def counts_from_tokens(tokens: jax.Array, vocab: int) -> jax.Array:
    """i32[B, H] token histories (-1 = padding) -> i32[B, V] counts."""
    z = jnp.zeros((tokens.shape[0], vocab), jnp.int32)
    return _scatter_rows(z, tokens, jnp.ones(tokens.shape, jnp.int32), "add")


def record_tokens(counts: jax.Array, slots: jax.Array, tokens: jax.Array,
                  valid: jax.Array) -> jax.Array:
    """Slot-indexed state i32[S, V]: counts[slots[b], tokens[b]] += 1 where valid[b]."""
    s = jnp.where(valid, slots, counts.shape[0])
    return counts.at[s, tokens].add(1, mode="drop")


# ---- host side -----------------------------------------------------------------------------------
def _width(n: int) -> int:
    return 0 if n == 0 else next((w for w in WIDTH_BUCKETS if w >= n), -(-n // 512) * 512)


def row_seed(seed: int | None, salt: int) -> int:
    """A request's u32 seed: its own (any int, e.g. OpenAI's) or one derived from `salt`."""
    if seed is None:
        return int(np.uint32((salt * 0x9E3779B1 + 0x7F4A7C15) % 2**32))
    return int(seed % 2**32)


def pack(rows: Sequence[Any | None], batch_size: int, steps: Sequence[int],
         seeds: Sequence[int], stop_ids: Sequence[Sequence[int]] = ()
         ) -> tuple[SamplingBatch, SamplerFlags]:
    """Per-row params (objects with SamplingParams' attributes; None = a padding row) -> numpy
    SamplingBatch (without penalty counts) and the batch's static flags.

    steps[i]: tokens row i generated so far; seeds[i]: its `row_seed`; stop_ids[i]: the ids
    min_tokens bans for row i (EOS + stop_token_ids), used only while steps[i] < min_tokens.
    Penalty state (`output_counts`, `prompt_mask`) is the caller's: set it with `._replace` when
    flags.penalties.
    """
    b = batch_size
    temp = np.zeros(b, np.float32)
    top_k = np.zeros(b, np.int32)
    top_p = np.ones(b, np.float32)
    seed = np.zeros(b, np.uint32)
    step = np.zeros(b, np.int32)
    pres, freq, rep = np.zeros(b, np.float32), np.zeros(b, np.float32), np.ones(b, np.float32)
    bias: list[tuple] = [()] * b
    bans: list[Sequence[int]] = [()] * b
    want_lp, top_n = False, 0
    for i, p in enumerate(rows):
        if p is None:
            continue
        temp[i], top_p[i] = p.temperature, p.top_p
        top_k[i] = max(p.top_k, 0)
        seed[i], step[i] = seeds[i], steps[i]
        pres[i] = getattr(p, "presence_penalty", 0.0)
        freq[i] = getattr(p, "frequency_penalty", 0.0)
        rep[i] = getattr(p, "repetition_penalty", 1.0)
        bias[i] = tuple(getattr(p, "logit_bias", ()) or ())
        if steps[i] < getattr(p, "min_tokens", 0) and i < len(stop_ids):
            bans[i] = tuple(stop_ids[i])
        n = getattr(p, "logprobs", None)
        if n is not None:
            want_lp, top_n = True, max(top_n, n)
    stochastic = bool((temp > 0).any())
    flags = SamplerFlags(
        stochastic=stochastic,
        truncate=stochastic and bool(((temp > 0) & ((top_k > 0) | (top_p < 1))).any()),
        penalties=bool((pres != 0).any() or (freq != 0).any() or (rep != 1).any()),
        bias_width=_width(max(len(x) for x in bias)), stop_width=_width(max(len(x) for x in bans)),
        logprobs=want_lp, top_n=TOP_LOGPROBS_MAX if top_n else 0)
    sb = SamplingBatch(temp, top_k, top_p, seed, step)
    if flags.penalties:
        sb = sb._replace(presence=pres, frequency=freq, repetition=rep)
    if flags.bias_width:
        ids = np.full((b, flags.bias_width), -1, np.int32)
        vals = np.zeros((b, flags.bias_width), np.float32)
        for i, pairs in enumerate(bias):
            for j, (t, v) in enumerate(pairs):
                ids[i, j], vals[i, j] = t, v
        sb = sb._replace(bias_ids=ids, bias_values=vals)
    if flags.stop_width:
        ids = np.full((b, flags.stop_width), -1, np.int32)
        for i, ban in enumerate(bans):
            ids[i, :len(ban)] = ban
        sb = sb._replace(stop_ids=ids)
    return sb, flags


# ---- the one-row sampler generate.py and the engine used before sample_batch ---------------------
@functools.partial(jax.jit, static_argnames=("top_k",))
def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: int = 0) -> jax.Array:
    """logits: [batch, vocab] -> token ids [batch]. temperature 0 means greedy. (Legacy: top_k is
    static here; new code uses sample_batch.)"""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    sorted_logits = jnp.sort(scaled, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    keep = cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p  # the first token always stays
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    drawn = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy)
