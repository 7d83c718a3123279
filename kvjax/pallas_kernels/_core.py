"""Shared machinery of the paged decode kernels: launchers, online softmax, split-KV combine.

A kernel is a (key format, value format) pair over one layer of a cache segment (kvjax/cache):

* a *key format* turns the query into what its score needs, once per step, outside the kernel
  (``prepare_q``: GQA group padded, softmax scale folded in, channels permuted into the "phase"
  order of packed codes, TurboQuant's rotation/projection) and scores a tile of pages from its
  codes (``score`` -> [Gp, T]);
* a *value format* accumulates ``p @ values`` from the codes of a tile (``accumulate``), in
  whatever basis/order is cheapest (phase order, TurboQuant's rotated basis), and maps the
  accumulator back once per step, after the split combine (``finalize``).

Pool leaves [layers, kv_heads, num_pages, rows, n] are reshaped (free) to [layers * kv_heads *
num_pages, rows, n], and the kernel addresses page ``p`` of (layer, head) as ``(layer * kv_heads +
head) * num_pages + p``: the layer index is a runtime scalar (the model scans over layers), so no
per-layer slice of the pool is ever copied.

Packed codes (b bits LSB-first along head_dim, kvjax/quant/packing.py) are decoded without any
interleave: for b in {1, 2, 4, 8} byte j holds channels j*P + r (P = 8 / b) at bit b*r; for b = 3
each 3-byte group j holds channels 8j + r. Channel j*P + r is "phase r, column j": the query is
permuted into phases once per step, scores sum one dot per phase, values accumulate per phase and
are permuted back once per step. Only shifts, masks and dots run in the kernel.
On the gather launchers (Triton, interpret) a format's ``gather_form()`` reads codes whose phase
tiles would be 16 columns or fewer as one channel-order tile instead (``unpack_channels``: the
word tile broadcast over its phases, shifted, merged), so every dot is >= 16 wide; Mosaic keeps
the phases.

Launchers (one kernel body, two ways to fetch a tile):

* ``gather`` (GPU Triton; CPU interpret): grid (batch, kv_heads, splits); each program loops over
  blocks of ``pages_per_block`` pages of its split with an in-kernel gather through the page table
  (an ordinary input: GPU lowerings have no scalar prefetch).
* ``tpu`` (Mosaic; also runs interpreted): ``PrefetchScalarGridSpec`` with the page table,
  lengths, layer and window slots in SMEM; grid (batch, kv_heads, splits, pages_per_split); the
  BlockSpec index_map fetches one page per step (past the sequence's last page it repeats the last
  page, which the pipeline does not re-fetch); m/l/acc live in VMEM scratch.

Both write per-split partial (m, l, acc); ``combine`` merges them with the log-sum-exp rule.
With ``with_mass`` (H2O) they also write every raw score, and ``mass_from_scores`` turns them into
each position's softmax mass with the final max and denominator. A
segment with a full-precision window gets one extra program per (batch, head) that attends the
ring's valid entries (positions in [length - W, length)) with the original query; pages then only
serve positions below length - W. A segment with an exact sink (kvjax/cache/paged.py) passes
each row's ``page_lo`` (the sink's length where its tags match, else 0): pages serve positions
from it, and the sink's few bf16 tokens are attended in XLA (``sink_part``) and merged with the
window's part before the combine.

Files: tile helpers and formats in _formats.py, kernel bodies in _launch.py, the two launchers'
pallas_calls in _pallas_call.py (all re-exported here); the entry point ``decode``, ``combine``
and the mass here.
"""


from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache.paged import sink_page_lo
from kvjax.pallas_kernels import _rowed, compat

# Re-exported: every name other modules (ragged_attention, the format families) import
# from _core stays importable from here.
from kvjax.pallas_kernels._formats import (  # noqa: F401
    _FLOAT_BITS,
    KeyFormat,
    Loader,
    ValueFormat,
    bits_to,
    code_tiles,
    dot_nn,
    dot_nt,
    from_phases,
    int_bits_to,
    lookup,
    n_tiles,
    phases_of,
    q_tiles,
    sanitize,
    to_phases,
    unpack_channels,
    unpack_phases,
)
from kvjax.pallas_kernels._launch import (  # noqa: F401
    MASK,
    WINDOW_CHUNK,
    Plan,
    _cdiv,
    _emitter,
    _gather_kernel,
    _init_state,
    _online,
    _tpu_kernel,
    _window_update,
    scratch_page_step,
)
from kvjax.pallas_kernels._pallas_call import _out_map, launch  # noqa: F401
from kvjax.pool_formats import whole_operand

BACKENDS = ("auto", "triton", "tpu", "interpret", "interpret_tpu", "mosaic_gpu")


# backend "auto": the lowering is chosen per platform when the step is lowered
# (lax.platform_dependent), not from jax.default_backend(): a step traced on a CPU host for a TPU
# or GPU target (AOT compile, kvjax.bench.compile) must hold the Mosaic / Triton call.
AUTO_BACKENDS = {"cuda": "triton", "rocm": "triton", "tpu": "tpu", "cpu": "interpret"}


def resolve_backend(backend: str) -> str:
    """Validate an explicit backend; "auto" stays "auto" (resolved per platform in decode)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown Pallas backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "mosaic_gpu":
        raise NotImplementedError(
            "the Mosaic GPU paged kernels are not written yet; use backend='triton' on GPU "
            f"(Mosaic GPU available in this jax: {compat.has_mosaic_gpu()})")
    return backend




def combine(vfmt: ValueFormat, accs, m, den, window, layer: jax.Array | None = None
            ) -> jax.Array:
    """Merge split partials (and the window's) with the log-sum-exp rule -> [B, Hkv, Gp, D].
    layer (segment-relative): given, the value format's per-layer finalize runs."""
    big = jnp.max(m, axis=2)  # [B, Hkv, Gp, 1]
    if window is not None:
        big = jnp.maximum(big, window[1])
    wts = jnp.exp(m - big[:, :, None])  # [B, Hkv, S, Gp, 1]
    denom = jnp.sum(wts * den, axis=2)

    def merge(a):  # a [B, Hkv, S, Gp, n]
        return jnp.sum(wts * a, axis=2)

    merged = tuple(merge(a) for a in accs)
    out = vfmt.finalize(merged) if layer is None else vfmt.finalize_layer(merged, layer)
    if window is not None:
        ww = jnp.exp(window[1] - big)
        out = out + ww * window[0]
        denom = denom + ww * window[2]
    return out / jnp.maximum(denom, 1e-30)


def merge_parts(a, b):
    """Two plain-value softmax parts (acc [..., D], m, l [..., 1]) merged by log-sum-exp."""
    big = jnp.maximum(a[1], b[1])
    wa, wb = jnp.exp(a[1] - big), jnp.exp(b[1] - big)
    return a[0] * wa + b[0] * wb, big, a[2] * wa + b[2] * wb


def sink_part(seg, layer: jax.Array, qg: jax.Array, slots: jax.Array, hi: jax.Array):
    """The exact sink's softmax part, in XLA (a few bf16 tokens: a tiny dense attention).

    qg [B, Hkv, R, D] f32 scaled queries in channel order (R query rows per KV head); slots
    [B]; hi [B] int32: sink entries j < hi are attended (min(page_lo, first position of the
    ring or past the context)). Returns (acc [B, Hkv, R, D], m, l [B, Hkv, R, 1], raw scores
    [B, Hkv, R, sinks])."""
    def rows(x):  # [layers, Hkv, slots', n, D] bf16 bits -> [B, Hkv, n, D] f32
        x = jnp.moveaxis(x[layer][:, slots], 1, 0)
        return jax.lax.bitcast_convert_type(x, jnp.bfloat16).astype(jnp.float32)

    sk, sv = rows(seg.sk), rows(seg.sv)
    valid = (jnp.arange(seg.sinks)[None, :] < hi[:, None])[:, None, None, :]  # [B, 1, 1, n]
    sc = jnp.einsum("bhrd,bhnd->bhrn", qg, sk, precision="highest")
    s = jnp.where(valid, sc, MASK)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid, jnp.exp(s - m), 0.0)
    acc = jnp.einsum("bhrn,bhnd->bhrd", p, jnp.where(valid[:, :, 0, :, None], sv, 0.0),
                     precision="highest")
    return acc, m, jnp.sum(p, axis=-1, keepdims=True), sc


def softmax_stats(m, den, window) -> tuple[jax.Array, jax.Array]:
    """The final row max and denominator [B, Hkv, Gp, 1] over every split and the window (the
    same log-sum-exp merge as combine)."""
    big = jnp.max(m, axis=2)
    if window is not None:
        big = jnp.maximum(big, window[1])
    denom = jnp.sum(jnp.exp(m - big[:, :, None]) * den, axis=2)
    if window is not None:
        denom = denom + jnp.exp(window[1] - big) * window[2]
    return big, jnp.maximum(denom, 1e-30)


def mass_from_scores(plan: Plan, scores, big: jax.Array, denom: jax.Array, lengths: jax.Array,
                     ring_lo: jax.Array, g: int, max_pages: int, tpu: bool,
                     sink: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """H2O attention mass of one decode step: per cached position (page-table order), the
    softmax probability its key got, summed over the g query heads of its KV head, from the
    kernel's raw scores and the final max / denominator (so it equals the XLA path's `attend`
    mass). Positions the kernel did not score from pages (past the length, or served by the
    window) read as 0 or from the window's scores; ring_lo [B]: the window's first position
    (ring_lower_bound). sink: (page_lo [B], the sink's raw scores [B, Hkv, Gp, sinks]) where
    the segment has an exact sink: positions below page_lo take its mass (entries past the sink's
    served end are replaced by the ring's below). -> [B, Hkv, max_pages * page_size] f32."""
    s, pps, w = plan.page_size, plan.pages_per_split, plan.window
    b, hkv = plan.batch, plan.kv_heads
    sp = scores[0]
    if tpu:  # [B, Hkv, nsplit * pps, Gp, s]
        sp = jnp.moveaxis(sp[:, :, :plan.splits * pps], 3, 2)  # [B, Hkv, Gp, pages, s]
    else:  # [B, Hkv, nsplit, Gp, pps * s]
        sp = jnp.moveaxis(sp[:, :, :plan.splits], 3, 2)  # [B, Hkv, Gp, splits, pps * s]
    sp = sp.reshape(b, hkv, plan.gp, -1)[:, :, :g, :max_pages * s]
    big, denom = big[:, :, :g], denom[:, :, :g]
    pos = jnp.arange(max_pages * s)
    limit = ring_lo if w else lengths
    valid = pos[None, :] < limit[:, None]  # [B, T]
    if sink is not None:
        valid = valid & (pos[None, :] >= sink[0][:, None])
    valid = valid[:, None, None, :]  # [B, 1, 1, T]
    # where, not multiply: unscored positions hold whatever the output buffer held (NaN too)
    mass = jnp.sum(jnp.where(valid, jnp.exp(sp - big) / denom, 0.0), axis=2)  # [B, Hkv, T]
    if w:
        sw = scores[1]  # [B, Hkv, chunks, Gp, chunk]: ring entry j = chunk * c + lane
        sw = jnp.moveaxis(sw, 3, 2).reshape(b, hkv, plan.gp, w)[:, :, :g]
        mw = jnp.sum(jnp.exp(sw - big) / denom, axis=2)  # [B, Hkv, W]; entry j holds p % W == j
        in_ring = (pos[None, :] >= limit[:, None]) & (pos[None, :] < lengths[:, None])
        mass = jnp.where(in_ring[:, None], jnp.take(mw, pos % w, axis=2), mass)
    if sink is not None:
        n = sink[1].shape[-1]
        ms = jnp.sum(jnp.exp(sink[1][:, :, :g] - big) / denom, axis=2)  # [B, Hkv, sinks]
        in_sink = (pos[None, :] < jnp.minimum(sink[0], limit)[:, None])[:, None]  # [B, 1, T]
        mass = jnp.where(in_sink, jnp.take(ms, jnp.minimum(pos, n - 1), axis=2), mass)
    return mass


def ring_lower_bound(seg, layer: jax.Array, lengths: jax.Array, slots: jax.Array) -> jax.Array:
    """[B] first position the ring serves: the window's positions [length - W, length) from the
    last one whose ring tag (seg.wpos: the absolute position each entry holds) does not match it
    (never written, or written by the slot's previous sequence: a prefix-cache hit whose first
    chunk was shorter than the window); pages serve every position below. The XLA path
    (kvjax.attention.gather_kv) takes each position from the ring iff its tag matches; the two
    agree whenever the unwritten entries precede the written ones, as after a prefix hit."""
    w = seg.window
    tags = seg.wpos[layer, slots]  # [B, W]
    lo = lengths - w
    pos = lo[:, None] + jnp.remainder(jnp.arange(w)[None, :] - lo[:, None], w)  # entry j's
    bad = (pos >= 0) & (pos < lengths[:, None]) & (tags != pos)
    last_bad = jnp.max(jnp.where(bad, pos + 1, 0), axis=1)
    return jnp.minimum(jnp.maximum(jnp.maximum(lo, 0), last_bad), lengths).astype(jnp.int32)


def kernel_leaf(seg, x: jax.Array, layer: jax.Array, tpu: bool, key: bool = False,
                ring: bool = False) -> jax.Array:
    """A pool leaf (or a window ring) of `seg`, [layers, Hkv, pages, rows, n], as a kernel
    operand [n_layers * Hkv * pages, rows, n]: the whole leaf (the kernel's index map adds the
    layer) for the gather launchers, and on TPU for pinned leaves the layer loop carries in the
    Mosaic layout (`whole_operand`; key: a key leaf, sealed for KIVI); otherwise the layer's
    slice (the index map takes layer 0).

    Why the slice on TPU: the Mosaic call takes its operands row-major with (8|16|32, 128)
    tiles, which is not the layout XLA gives a leaf whose last dim is under 128 lanes (head_dim
    64, packed codes, per-token scales: pages become the lane dim), so XLA relayouts every
    operand before the call; a whole [layers, ...] pool made that a copy of every layer's pages
    in every layer (temp 16 GB for SmolLM2 bf16 at 128K). A pinned whole leaf is no copy at
    all. Rings are always sliced: a layer's ring is a few KB a sequence, and whole they cost
    more (v5e int8 32K decode: 486 MB a step with sliced rings, 564 MB whole). (No copy for the
    narrow leaves needs lane-dense pages: see BENCHMARKS, compiled steps.)"""
    sealed = key and seg.k_spec.group > 1
    if tpu and (ring or not whole_operand(seg, x, sealed)):
        x = jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=True)
    return x.reshape(x.shape[0] * x.shape[1] * x.shape[2], *x.shape[3:])


def triton_tuning(kfmt: KeyFormat, vfmt: ValueFormat, head_dim: int,
                  ragged: bool = False) -> tuple[int, int]:
    """(tokens per block, num_warps) for the Triton kernel, from compiling for h100 (ptxas
    registers and spills, 255 the cap; PTX instructions per loop iteration x warps / tokens as
    the issue cost per token): head_dim 128 takes 32 tokens, 64 takes 64, over 4 warps.
    TurboQuant took 16 tokens over 8 warps while its 3-bit phases ran the multiply-and-reduce
    fallback near the register cap; with those merged (_formats.merged) and the select tree,
    32 tokens over 4 warps cost 220-253 warp-instructions a token at d128 (turbo4 / 3.5 / 2.5:
    123 / 168 / 128 registers) against 342-638 at 16 tokens over 4 or 8 warps. Phase-tile
    forms (the ragged kernel's) keep the old rule: 16 tokens, 8 warps for channel splits
    (turbo2.5/3.5) and d64, else 4. Calibrated (channel-ordered) TurboQuant decode at d64 takes
    64 tokens like the other formats: SmolLM2's calibrated turbo3 decode at 32 tokens over 4 warps
    spilled 24 bytes (96 registers); at 64, 168 registers and none (turbo3.5: 128 -> 168). The
    ragged kernel (`ragged`: its query block is a tile of rows, not one) keeps 32: at 64 its
    calibrated turbo3.5 d64 spilled 64-80 bytes."""
    if "Turbo" in type(kfmt).__name__ or "Turbo" in type(vfmt).__name__:
        if getattr(kfmt, "channel_order", False):
            return (64 if head_dim <= 64 and not ragged else 32), 4
        split = any(len(getattr(f, "parts", ())) > 1 for f in (kfmt, vfmt))
        return 16, 8 if split or head_dim <= 64 else 4
    if getattr(kfmt, "channel_order", False) and "Kivi" in type(kfmt).__name__:
        # kivi2 d64 over two 32-token pages spilled 40 bytes (128 registers); one page: 120, none
        return 32, 4
    return (64 if head_dim <= 64 else 32), 4


# Split-KV sizing for the gather (Triton) launcher, as FlashDecoding does: at small batch the
# grid batch x kv_heads x splits must still fill the GPU (H100 SXM / H200: 132 SMs; the bench's
# batch 1 x 8 KV heads x 8 splits was 64 programs, 12% of copy bandwidth at 128K), but every split
# writes a [Gp, D] f32 partial that the combine reads back, so a split keeps >= 256 tokens.
GPU_SMS = 132
PROGRAMS_PER_SM = 4  # memory-bound: several programs per SM keep loads in flight
MIN_SPLIT_TOKENS = 256
TPU_SPLITS = 8  # TPU: splits are an "arbitrary" grid axis (sequential), 8 as before


def auto_splits(batch: int, kv_heads: int, blocks: int, block_tokens: int) -> int:
    """KV splits per (row, KV head) for a gather-launcher call over `blocks` blocks of
    `block_tokens` tokens: enough programs for PROGRAMS_PER_SM on every SM, each split at
    least MIN_SPLIT_TOKENS long (and at least one block)."""
    want = -(-GPU_SMS * PROGRAMS_PER_SM // (batch * kv_heads))
    most = max(1, blocks * block_tokens // MIN_SPLIT_TOKENS)
    return max(1, min(want, most, blocks))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _triton_ok(q: jax.Array, seg) -> bool:
    return all(_pow2(v) for v in (seg.k_spec.page_size, q.shape[-1], seg.window or 1))


def decode(q: jax.Array, seg, layer: jax.Array, page_table: jax.Array, lengths: jax.Array,
           window_slots: jax.Array | None, kfmt: KeyFormat, vfmt: ValueFormat, *,
           backend: str = "auto", k_splits: int = 0, pages_per_block: int = 0,
           num_warps: int = 0, num_stages: int = 2, with_mass: bool = False
           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """One decode step of attention over one layer of a cache segment (kvjax/cache/paged.py).

    q: [batch, 1, num_heads, head_dim]; layer: int32 scalar (index within the segment);
    page_table: [batch, max_pages] int32; lengths: [batch] int32 tokens valid (this step's
    included; the query is the sequence's last token); window_slots: [batch] ring slot per row
    (segments with a window). Returns [batch, 1, num_heads, head_dim] in q's dtype; with
    `with_mass` (static; H2O) also the attention mass [batch, kv_heads, max_pages * page_size]
    f32 (mass_from_scores: the kernel writes its scores, the mass is one elementwise pass over
    them with the final max and denominator). Off, the kernel is unchanged. k_splits: KV
    splits per (row, KV head); 0 (auto): auto_splits on the gather launcher, TPU_SPLITS on TPU.
    """
    backend = resolve_backend(backend)
    if backend == "auto":
        def branch(name):
            if name == "triton" and not _triton_ok(q, seg):
                name = "interpret"  # non-power-of-two shapes: Triton cannot tile them

            def run(*a):
                return decode(*a, kfmt, vfmt, backend=name, k_splits=k_splits,
                              pages_per_block=pages_per_block, num_warps=num_warps,
                              num_stages=num_stages, with_mass=with_mass)
            return run

        branches = {p: branch(b) for p, b in AUTO_BACKENDS.items()}
        return jax.lax.platform_dependent(q, seg, layer, page_table, lengths, window_slots,
                                          default=branches["cpu"], **branches)
    if q.ndim != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [batch, 1, num_heads, head_dim] (one decode token), got "
                         f"{q.shape}; multi-token chunks go through the XLA path")
    bsz, _, nh, d = q.shape
    leaf = seg.k[0]
    hkv, n_pages, s = leaf.shape[1], leaf.shape[2], seg.k_spec.page_size
    if d != seg.k_spec.head_dim:
        raise ValueError(f"q head_dim {d} != the cache's {seg.k_spec.head_dim}")
    if nh % hkv:
        raise ValueError(f"{nh} query heads are not a multiple of {hkv} KV heads")
    if page_table.ndim != 2 or page_table.shape[0] != bsz:
        raise ValueError(f"page_table must be [batch={bsz}, max_pages], got {page_table.shape}")
    if lengths.shape != (bsz,):
        raise ValueError(f"lengths must be [batch={bsz}], got {lengths.shape}")
    window = seg.window
    if window and (window_slots is None or window_slots.shape != (bsz,)):
        raise ValueError(f"a segment with a window needs window_slots [batch={bsz}]")
    if backend in ("triton", "interpret"):
        for name, v in (("page_size", s), ("head_dim", d), ("window", window or 1)):
            if not _pow2(v):
                raise ValueError(f"the Triton kernel needs a power-of-two {name}, got {v}")
    if backend in ("triton", "interpret"):
        kfmt, vfmt = kfmt.gather_form(), vfmt.gather_form()
    g = nh // hkv
    gp = max(16, 1 << (g - 1).bit_length())
    mp = page_table.shape[1]
    sub = 1
    if backend in ("tpu", "interpret_tpu"):
        ppb = 1
    else:
        tokens, warps = triton_tuning(kfmt, vfmt, d)
        ppb = pages_per_block or max(1, tokens // s)
        num_warps = num_warps or warps
        if not pages_per_block and tokens < s and kfmt.per_token_rows and vfmt.per_token_rows:
            sub = s // tokens  # blocks of part of a page (every leaf has a row per token)
        ppb = min(ppb, 1 << (mp - 1).bit_length())
    blocks = -(-mp // ppb)
    if not k_splits:  # auto
        tpu_launch = backend in ("tpu", "interpret_tpu")
        k_splits = TPU_SPLITS if tpu_launch else auto_splits(bsz, hkv, blocks, ppb * s)
    splits = max(1, min(k_splits, blocks))
    pps = -(-mp // (splits * ppb)) * ppb
    pad = splits * pps - mp
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, pad)))
    def rowed_of(pool):
        return tuple(backend in ("tpu", "interpret_tpu") and _rowed.is_rowed(x, s) for x in pool)

    plan = Plan(batch=bsz, kv_heads=hkv, num_pages=n_pages, page_size=s, gp=gp, head_dim=d,
                splits=splits, pages_per_split=pps, pages_per_block=ppb, window=window,
                ring_slots=seg.wk.shape[2] if window else 0, sub_blocks=sub, mass=with_mass,
                rowed=rowed_of(seg.k) + rowed_of(seg.v))

    qg = q.reshape(bsz, hkv, g, d).astype(jnp.float32) * (d ** -0.5)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    layer = jnp.asarray(layer, jnp.int32)
    qs = kfmt.prepare_q_layer(qg, layer)

    tpu = backend in ("tpu", "interpret_tpu")

    ring = None
    lengths = lengths.astype(jnp.int32)
    slots = (jnp.zeros((bsz,), jnp.int32) if window_slots is None
             else window_slots.astype(jnp.int32))
    if window:
        ring = (qg, kernel_leaf(seg, seg.wk, layer, tpu, ring=True),
                kernel_leaf(seg, seg.wv, layer, tpu, ring=True))
        ring_lo = ring_lower_bound(seg, layer, lengths, slots)
    else:
        ring_lo = lengths
    page_lo = (sink_page_lo(seg, layer, slots) if seg.sinks
               else jnp.zeros((bsz,), jnp.int32))
    def leaves(pool, key=False):  # TPU: per-token scalar leaves as gathered rows (_rowed)
        return tuple(_rowed.gather_rows(x, layer, pt) if r else kernel_leaf(seg, x, layer, tpu, key)
                     for x, r in zip(pool, rowed_of(pool), strict=True))

    accs, m, den, win, scores = launch(plan, kfmt, vfmt, qs, leaves(seg.k, key=True),
                             leaves(seg.v), ring, layer, lengths, ring_lo, slots, pt, page_lo,
                             backend=backend, num_warps=num_warps, num_stages=num_stages)
    sink = None
    if seg.sinks:  # the exact sink serves [0, min(page_lo, ring_lo)); merged with the window's
        acc_s, m_s, l_s, sink_sc = sink_part(seg, layer, qg, slots,
                                             jnp.minimum(page_lo, ring_lo))
        win = (acc_s, m_s, l_s) if win is None else merge_parts(win, (acc_s, m_s, l_s))
        sink = (page_lo, sink_sc)
    out = combine(vfmt, accs, m, den, win, layer)  # [B, Hkv, Gp, D]
    out = out[:, :, :g].reshape(bsz, 1, nh, d).astype(q.dtype)
    if not with_mass:
        return out
    big, denom = softmax_stats(m, den, win)
    return out, mass_from_scores(plan, scores, big, denom, lengths, ring_lo, g, mp, tpu, sink)
