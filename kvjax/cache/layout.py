"""Page layouts: how K or V of one group of layers is stored, for every KV cache dtype.

A pool holds the codes a quantizer produces (kvjax/quant), one array per codes leaf:

    per-token leaf  [layers, kv_heads, num_pages, page_size, n]       codes, per-token scales
    per-group leaf  [layers, kv_heads, num_pages, page_size // G, n]  KIVI keys' per-channel
                                                                      scale and zero (G tokens)

so a page id indexes a page's codes *and* its metadata: freeing, sharing or moving a page moves
both. Floats narrower than 32 bits are stored as their raw bits (uint8/uint16): XLA's CPU backend
widens bf16/f16/fp8 arrays around a scatter, which turned every cache write into a copy of the
whole pool (2.6 s per decode step at 2000 pages, against 0.03 ms as uint16).

Per-token methods (bf16, fp8, int, TurboQuant, PolarQuant, KIVI values) are quantized as tokens
are written. TurboQuant pools built with a KV calibration (kvjax/calibrate.py, per layer and KV
head) first centre each key on the calibrated mean when that shortens it (the flag rides in the
sign bit of the key's first stored norm, so it costs no byte) and, for fractional widths, order
the channels outliers-first, so the split's first n channels are the measured outliers.

KIVI keys are quantized per channel over a group of G tokens, so a page of keys is
written ("sealed") only once its last token arrives; until then its tokens are read from the
sequence's full-precision window (kvjax/cache/paged.py): KIVI needs window >= page size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from kvjax.calibrate import KVCalibration
from kvjax.quant import ChannelSplit, Quantizer, make_quantizer
from kvjax.quant.plain import PlainQuantizer
from kvjax.rope import rotate_half

_RAW = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def storage_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """What a leaf of logical dtype `dtype` is stored as (narrow floats as raw unsigned bits)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype({1: jnp.uint8, 2: jnp.uint16}[dtype.itemsize])
    return dtype


def to_storage(x: jax.Array, stored: jnp.dtype) -> jax.Array:
    """Values in their logical dtype -> the words a pool of dtype `stored` holds."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(stored) != x.dtype:
        return jax.lax.bitcast_convert_type(x, stored)
    return x.astype(stored)


def from_storage(words: jax.Array, logical: jnp.dtype) -> jax.Array:
    if words.dtype == jnp.dtype(logical):
        return words
    return jax.lax.bitcast_convert_type(words, logical)


def scatter_rows(*rows: jax.Array) -> tuple[jax.Array, ...]:
    """A scatter's row-aligned indices and updates (leading axis: rows) with at least two rows:
    one row is repeated (the same value written twice to the same place).

    XLA rewrites a one-row scatter (every write of a batch-1 decode step) as a
    dynamic-update-slice, which its CPU fusion then duplicates into the gathers that read the
    cache back in the same step; those read the pool as it was before the write, so the whole
    pool leaf was copied on every step to keep both versions alive. A scatter is never fused
    into its readers, and XLA updates it in place."""
    if rows[0].shape[0] != 1:
        return rows
    return tuple(jnp.concatenate([r, r]) for r in rows)


def _heads(kv_heads: int) -> jax.Array:
    """[1, kv_heads] head indices for a pool write that scatters each (row, head) separately.

    A scatter's window dims become the minor dims of the layout XLA:TPU picks for its operand.
    With every head in the window ([heads, n] per token), the pool leaves of a scanned model
    were carried through the layer loop as [.., pages, rows, heads, n] (8-bit leaves padded 3
    heads -> 16 rows): 10.7x an int8 d64 leaf, then copied to the row-major Mosaic operand
    layout and back every layer. Indexing the head makes the window one token's n codes, and
    XLA carries the pool row-major, which is the Mosaic operand layout: no copy inside the
    loop (SmolLM2 int8 32K one-layer decode on v5e: copy traffic 260 -> 115 MB). What is left
    is a copy at the loop's entry and exit: XLA's default layout for a leaf under 128 lanes
    puts pages on lanes (lane-dense pages would remove it; BENCHMARKS, compiled steps)."""
    return jnp.arange(kv_heads, dtype=jnp.int32)[None, :]


def low_frequency_channels(head_dim: int, n: int) -> tuple[int, ...]:
    """The channels that get the extra bit in fractional TurboQuant widths (2.5, 3.5 bits).

    A cache's split must be a constant of the config, chosen before any data is seen. Post-RoPE
    keys of Llama-family models carry their large, persistent outliers in the lowest-frequency
    rotary pairs (channel i pairs with i + head_dim/2 in the rotate-half layout; frequency falls
    with i), so those pairs get the wider codes, both members of a pair together.
    """
    half = head_dim // 2
    pairs = [i for i in range(half - 1, -1, -1)][: (n + 1) // 2]
    chans = sorted({c for i in pairs for c in (i, i + half)})
    return tuple(chans[:n]) if len(chans) > n else tuple(chans)


@dataclass(frozen=True)
class PoolSpec:
    """How K (role "key") or V (role "value") is stored. Static: hashed into the jit cache key."""

    method: str  # "bf16", "f32" or a kvjax.quant name ("fp8_e4m3", "int4", "kivi4", "turbo3.5"...)
    role: str
    head_dim: int
    page_size: int
    seed: int = 0
    # Per layer / KV head statistics (TurboQuant methods only; others ignore it), indexed by
    # first_layer + the layer index within the segment.
    calibration: KVCalibration | None = None
    first_layer: int = 0

    @functools.cached_property
    def quantizer(self) -> Quantizer:
        if self.method in _RAW:
            return PlainQuantizer(head_dim=self.head_dim, dtype=_RAW[self.method])
        qz = make_quantizer(self.method, head_dim=self.head_dim, seed=self.seed, role=self.role)
        if isinstance(qz, ChannelSplit):
            # Calibrated: channels arrive outliers-first (see _pre), so the split takes the first
            # n. Otherwise a guess fixed by the config: the lowest-frequency RoPE pairs.
            hi = (tuple(range(len(qz.hi_channels))) if self.calibrated else
                  low_frequency_channels(self.head_dim, len(qz.hi_channels)))
            qz = qz.replace(hi_channels=hi, calibrated=True)
        return qz

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None and self.method.startswith("turbo")

    @property
    def centred(self) -> bool:
        """Keys centred on the calibrated mean (per token, when that shortens the key)."""
        return self.calibrated and self.role == "key"

    @property
    def rope_centred(self) -> bool:
        """Keys centred on the position-rotated pre-RoPE mean R(p) k_mean_rope (format-2
        calibrations): writers and readers need each token's absolute position."""
        return self.centred and self.calibration.rope_centred

    def _mean(self, layer: jax.Array, positions: jax.Array | None) -> jax.Array:
        """The mean keys are centred on: k_mean [h, d], or R(p) k_mean_rope [h, *positions, d]
        (kvjax.rope.rotate_half, as the model turns its keys)."""
        cal = self.calibration
        if not self.rope_centred:
            return jnp.asarray(cal.k_mean)[layer + self.first_layer]
        if positions is None:
            raise ValueError("RoPE-centred keys need their absolute positions")
        mu = jnp.asarray(cal.k_mean_rope)[layer + self.first_layer]  # [h, d]
        mu = mu.reshape((mu.shape[0],) + (1,) * positions.ndim + (mu.shape[1],))
        return rotate_half(mu, positions[None], jnp.asarray(cal.rope_inv_freq))

    @property
    def reordered(self) -> bool:
        """Channels reordered outliers-first per layer/head (fractional widths)."""
        return self.calibrated and isinstance(self.quantizer, ChannelSplit)

    @property
    def transformed(self) -> bool:
        """Codes hold centred and/or reordered vectors (a reader must undo it per layer/head)."""
        return self.centred or self.reordered

    def _order(self, layer: jax.Array) -> jax.Array:
        cal = self.calibration
        order = cal.k_order if self.role == "key" else cal.v_order
        return jnp.asarray(order)[layer + self.first_layer]  # [kv_heads, head_dim]

    def _pre(self, x: jax.Array, layer: jax.Array, positions: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array | None]:
        """x [n, kv_heads, d] -> (what the quantizer sees, centred flag [n, kv_heads, 1]).
        positions: [n] absolute positions (RoPE-centred keys)."""
        flag = None
        x = x.astype(jnp.float32)
        if self.centred:
            mu = self._mean(layer, positions)  # [h, d] or [h, n, d]
            xc = x - (jnp.moveaxis(mu, 0, 1) if self.rope_centred else mu)
            # Sinks (short keys far from the mean) stay as they are: centring would lengthen
            # them, and their error weighs on every query that parks its mass on them.
            flag = jnp.sum(xc * xc, -1, keepdims=True) < jnp.sum(x * x, -1, keepdims=True)
            x = jnp.where(flag, xc, x)
        if self.reordered:
            x = jnp.take_along_axis(x, jnp.broadcast_to(self._order(layer), x.shape), axis=-1)
        return x, flag

    def _post(self, x: jax.Array, flag: jax.Array | None, layer: jax.Array,
              positions: jax.Array | None = None) -> jax.Array:
        """Inverse of _pre on dequantized x [h, ..., d] (kv_heads first, as read() has it);
        positions: x's middle axes (RoPE-centred keys)."""
        h, d = x.shape[0], x.shape[-1]
        lead = (h,) + (1,) * (x.ndim - 2) + (d,)
        if self.reordered:
            inv = jnp.argsort(self._order(layer), axis=-1).reshape(lead)
            x = jnp.take_along_axis(x, jnp.broadcast_to(inv, x.shape), axis=-1)
        if flag is not None:
            mu = self._mean(layer, positions)
            x = x + jnp.where(flag, mu if self.rope_centred else mu.reshape(lead), 0.0)
        return x

    @functools.cached_property
    def _flag_leaf(self) -> int:
        """Index of the leaf whose sign bit carries the centred flag: the first stored norm."""
        codes = jax.eval_shape(self.quantizer.quantize,
                               jax.ShapeDtypeStruct((1, self.head_dim), jnp.float32))
        for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(codes)[0]):
            if getattr(path[-1], "name", None) == "norm":
                return i
        raise ValueError(f"{self.method} has no norm leaf to carry the centring flag")

    @property
    def group(self) -> int:
        """Tokens that share metadata (KIVI keys: G); 1 for per-token methods."""
        return self.quantizer.tokens_per_group

    @functools.cached_property
    def _leaves(self) -> tuple[jax.tree_util.PyTreeDef, tuple[tuple[bool, int, jnp.dtype], ...]]:
        """(codes treedef, per leaf (per_token, size, logical dtype)), from an abstract quantize."""
        g = self.group
        if self.page_size % g:
            raise ValueError(f"page_size {self.page_size} must be a multiple of {self.method}'s "
                             f"group of {g} tokens")
        shape = (g, self.head_dim) if g > 1 else (1, self.head_dim)
        codes = jax.eval_shape(self.quantizer.quantize, jax.ShapeDtypeStruct(shape, jnp.float32))
        leaves, treedef = jax.tree.flatten(codes)
        info = []
        for leaf in leaves:
            per_token = g == 1 or leaf.ndim == 2  # KIVI key q: [G, packed]; scale/zero: [d]
            info.append((per_token, leaf.shape[-1], leaf.dtype))
        return treedef, tuple(info)

    def bytes_per_token(self) -> float:
        """Stored bytes per token per KV head, metadata included."""
        _, info = self._leaves
        return sum(n * jnp.dtype(dt).itemsize / (1 if per_token else self.group)
                   for per_token, n, dt in info)

    def init(self, num_layers: int, kv_heads: int, num_pages: int) -> tuple[jax.Array, ...]:
        _, info = self._leaves
        return tuple(
            jnp.zeros((num_layers, kv_heads, num_pages,
                       self.page_size if per_token else self.page_size // self.group, n),
                      storage_dtype(dt))
            for per_token, n, dt in info)

    def _encode(self, x: jax.Array, layer: jax.Array | None = None,
                positions: jax.Array | None = None) -> list[jax.Array]:
        flag = None
        if self.calibrated:
            x, flag = self._pre(x, layer, positions)
        leaves = jax.tree.leaves(self.quantizer.quantize(x))
        if flag is not None:  # norms are >= 0: the sign bit is free (-0.0 keeps it too)
            i = self._flag_leaf
            leaves[i] = jnp.where(flag, -leaves[i], leaves[i])
        return [to_storage(leaf, storage_dtype(leaf.dtype)) for leaf in leaves]

    def write_tokens(self, pool: tuple[jax.Array, ...], layer: jax.Array, x: jax.Array,
                     pages: jax.Array, slots: jax.Array, positions: jax.Array | None = None
                     ) -> tuple[jax.Array, ...]:
        """Per-token methods: quantize and scatter each token's codes.

        x: [batch, tokens, kv_heads, head_dim]; pages, slots: [batch, tokens] (padding tokens are
        sent to the null page by the caller); positions: [batch, tokens] absolute positions
        (needed by RoPE-centred keys)."""
        b, t, h, d = x.shape
        pos = None if positions is None else positions.reshape(b * t)
        codes = self._encode(x.reshape(b * t, h, d), layer, pos)  # each [b*t, h, n]
        p, s, *codes = scatter_rows(pages.reshape(-1), slots.reshape(-1), *codes)
        # Page ids come from the page table and slots are `% page_size`: always in bounds, and
        # saying so spares XLA a bounds-check select over the whole pool. The KV head is an
        # index of the scatter, not part of its window: on TPU a [heads, n] window made XLA
        # lay the pool out with heads on sublanes (padded 3 -> 16 rows for 8-bit leaves) inside
        # the model's layer loop, then copy it to the row-major layout of the Mosaic call on
        # every layer (see _heads).
        return tuple(leaf.at[layer, _heads(h), p[:, None], s[:, None]].set(
                         c, mode="promise_in_bounds")
                     for leaf, c in zip(pool, codes, strict=True))

    def write_pages(self, pool: tuple[jax.Array, ...], layer: jax.Array, x: jax.Array,
                    pages: jax.Array) -> tuple[jax.Array, ...]:
        """Quantize whole pages (KIVI keys, sealed when their last token arrives).

        x: [n, kv_heads, page_size, head_dim]; pages: [n] (the null page for nothing-to-seal)."""
        n, h, s, d = x.shape
        g = self.group
        codes = self._encode(x.reshape(n, h, s // g, g, d))  # [n,h,s/g,g,packed] or [n,h,s/g,d]
        codes = [c.reshape(n, h, s, -1) if per_token else c
                 for c, (per_token, _, _) in zip(codes, self._leaves[1], strict=True)]
        pages, *codes = scatter_rows(pages, *codes)
        return tuple(leaf.at[layer, _heads(h), pages[:, None]].set(c, mode="promise_in_bounds")
                     for leaf, c in zip(pool, codes, strict=True))

    def roundtrip(self, x: jax.Array, layer: jax.Array, positions: jax.Array | None = None
                  ) -> jax.Array:
        """What a reader of these tokens' codes sees, without a pool (per-token methods; for
        measurements such as kvjax/sensitivity.py). x: [n, kv_heads, head_dim] -> same, f32;
        positions: [n] absolute positions (RoPE-centred keys)."""
        if self.group > 1:
            raise ValueError(f"{self.method} quantizes groups of tokens; roundtrip is per token")
        treedef, info = self._leaves
        leaves = [from_storage(jnp.moveaxis(w, 1, 0), dt)  # [h, n, k]
                  for w, (_, _, dt) in zip(self._encode(x, layer, positions), info,
                                           strict=True)]
        flag = None
        if self.centred:
            i = self._flag_leaf
            flag = jnp.signbit(leaves[i])
            leaves[i] = jnp.abs(leaves[i])
        y = self.quantizer.dequantize(jax.tree.unflatten(treedef, leaves))
        if self.calibrated:
            y = self._post(y, flag, layer, positions)
        return jnp.moveaxis(y, 0, 1).astype(jnp.float32)

    def read(self, pool: tuple[jax.Array, ...], layer: jax.Array, page_table: jax.Array,
             positions: jax.Array | None = None) -> jax.Array:
        """Dequantized values of the pages in `page_table` [batch, max_pages] for one layer:
        [kv_heads, batch, max_pages * page_size, head_dim] f32. positions: [batch, max_pages *
        page_size] each slot's absolute position (needed by RoPE-centred keys)."""
        treedef, info = self._leaves
        g = self.group
        leaves = []
        for leaf, (per_token, _, dt) in zip(pool, info, strict=True):
            words = jnp.moveaxis(leaf[layer, :, page_table], 2, 0)  # [h, b, max_pages, rows, n]
            h, b, mp, rows, n = words.shape
            if g > 1 and per_token:
                words = words.reshape(h, b, mp, rows // g, g, n)
            leaves.append(from_storage(words, dt))
        flag = None
        if self.centred:
            i = self._flag_leaf
            flag = jnp.signbit(leaves[i])  # [h, b, mp, rows, 1]
            leaves[i] = jnp.abs(leaves[i])
        x = self.quantizer.dequantize(jax.tree.unflatten(treedef, leaves))
        if self.calibrated:
            pos = None if positions is None else positions.reshape(x.shape[1:-1])
            x = self._post(x, flag, layer, pos)
        h, b, mp = x.shape[:3]
        return x.reshape(h, b, -1, self.head_dim).astype(jnp.float32)
