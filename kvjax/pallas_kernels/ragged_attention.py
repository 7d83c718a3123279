"""Ragged paged attention: prefill chunks and decode rows of one step in one kernel call, over
every cache format the decode kernels read (the formats of paged_decode / kivi_attention /
turboquant_attention, decoded by their ``KeyFormat.score`` / ``ValueFormat.accumulate``).

A row of the batch is a sequence with ``n = length - start`` new tokens at positions
``[start, length)`` (its chunk, padded to the step's ``tokens``; a decode row has n = 1, an idle
row n = 0). The kernel applies the full-precision-chunk rule of the XLA oracle
(kvjax.attention.paged_attention with chunk_kv): every row's queries attend to

* earlier context ``[0, start)`` through the compressed pages, except the positions the
  full-precision window ring holds (``[ring_lo, start)``, read from the bf16 ring), and
* the chunk's own keys and values ``[start, length)`` as computed (bf16 on accelerators: the model
  has them in registers already), passed in as arrays, causally.

The model calls it before writing the chunk (models/transformer.py), so the ring still holds the
W positions before the chunk and the pages everything older: nothing the chunk writes is read.

Design after vllm-project/tpu-inference's ragged paged attention v3: per (sequence, KV head,
query block) one program runs one online softmax over (1) the page blocks (each tile decoded once
for every query row of the block: query tokens x GQA group rows, padded to a power of two), (2)
the ring, (3) the chunk's key blocks up to the diagonal; query blocks past a row's own chunk do
no work (ragged lengths cost nothing but the grid). The page part keeps its accumulators in the
format's basis (phases, TurboQuant's rotated basis) and is finalized once outside the kernel, like
the decode kernels; ring and chunk share a plain accumulator; the two merge by log-sum-exp.

Launchers: ``triton`` (GPU) and ``interpret`` (CPU), ragged_triton.py: the gather launcher (an
in-kernel gather through the page table, like _core's); ``tpu`` (Mosaic) and ``interpret_tpu``,
ragged_tpu.py (one page per grid step through a BlockSpec, scalar prefetch). Both run the same
format code and the same ring + chunk code (``ring_and_chunk``). Backend "auto" picks the
lowering per platform when the step is lowered (Triton on GPU, Mosaic on TPU, the gather launcher
interpreted on CPU).

A segment with an exact sink (kvjax/cache/paged.py) passes each row's ``page_lo`` (the sink's
length where the row's sink tags match, else 0): the page part serves ``[page_lo, ring_lo)`` and
the sink's few bf16 tokens ``[0, min(page_lo, ring_lo))`` are attended in XLA
(``_core.sink_part``) and merged by log-sum-exp with the kernel's two parts.

One difference from the oracle, by design: ring entries are used from ``ring_lo`` on, the first
position after the last window position whose ring tag does not match (tags form a suffix in
every case the engine produces: a prefix hit leaves the positions before it untagged); the oracle
checks each entry's tag. Eviction (page_pos) and H2O mass stay on the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvjax.cache.paged import sink_page_lo
from kvjax.pallas_kernels._core import (
    MASK,
    WINDOW_CHUNK,
    KeyFormat,
    ValueFormat,
    _online,
    dot_nn,
    dot_nt,
    kernel_leaf,
    merge_parts,
    sink_part,
    triton_tuning,
)

BACKENDS = ("auto", "triton", "interpret", "tpu", "interpret_tpu")
AUTO = {"cuda": "triton", "rocm": "triton", "cpu": "interpret", "tpu": "tpu"}
# Query rows (tokens x GQA group) per TPU program: one MXU tile; KIVI / TurboQuant 32 (their
# unpacked phases, centroid selects and one-hot lane picks are [rows, ...] VMEM temporaries:
# turbo2.5 d128 at 128 rows needs more than v5e's 16 MiB of scoped VMEM).
TPU_ROWS, TPU_ROWS_HEAVY = 128, 32


def _cdiv(a, b: int):
    return jax.lax.div(a + (b - 1), jnp.int32(b))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class RaggedPlan:
    """Static shape plan of one call."""

    kv_heads: int
    num_pages: int  # per (layer, head)
    page_size: int
    head_dim: int
    gpow: int  # query heads per KV head, padded to a power of two
    q_block: int  # query tokens per program; rows = q_block * gpow
    pages_per_block: int
    sub_blocks: int  # blocks per page (a block is page_size // sub_blocks tokens)
    window: int
    ring_slots: int

    @property
    def rows(self) -> int:
        return self.q_block * self.gpow


def ring_and_chunk(qw, plan: RaggedPlan, *, active, ring_lo, ctx_end, clen, qb, fetch_ring,
                   convert, fetch_chunk):
    """Parts (2) and (3) of one program, both launchers: the ring [ring_lo, ctx_end) and the
    chunk's keys up to the diagonal, one online softmax with plain [rows, D] values.

    qw [rows, D] f32 (scaled queries, channel order); fetch_ring(j0, c) -> raw ring keys, values
    [c, D] (bf16 bits) of entries j0..j0+c; convert: bits -> f32 (bits_to / int_bits_to);
    fetch_chunk(k0, n) -> the chunk's keys, values [n, D] of tokens k0..k0+n (k0 a multiple of
    q_block). Returns (m, l [rows, 1], acc [rows, D])."""
    rows = plan.rows
    carry = (jnp.full((rows, 1), MASK, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
             (jnp.zeros((rows, plan.head_dim), jnp.float32),))
    if plan.window:
        w = plan.window
        c = min(w, WINDOW_CHUNK)
        lo = ctx_end - w  # entry j holds the position in [ctx_end - w, ctx_end) = j mod w
        lo_mod = jax.lax.rem(jax.lax.rem(lo, w) + w, w)

        def ring_ok(j0, shape, dim):
            p = lo + jax.lax.rem(j0 + jax.lax.broadcasted_iota(jnp.int32, shape, dim) - lo_mod
                                 + w, w)
            return (p >= ring_lo) & (p < ctx_end)

        def ring_body(i, carry):
            j0 = i * c
            valid, valid_col = ring_ok(j0, (1, c), 1), ring_ok(j0, (c, 1), 0)
            rk, rv = fetch_ring(j0, c)
            kt = jnp.where(valid_col, convert(rk, jnp.bfloat16), 0.0)
            vt = jnp.where(valid_col, convert(rv, jnp.bfloat16), 0.0)
            return _online(carry, dot_nt(qw, kt), valid, lambda p: (dot_nn(p, vt),))

        n_ring = jnp.where(active & (ring_lo < ctx_end), jnp.int32(w // c), jnp.int32(0))
        carry = jax.lax.fori_loop(jnp.int32(0), n_ring, ring_body, carry)

    bq = plan.q_block
    shift = plan.gpow.bit_length() - 1
    q_tok = qb * bq + (jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) >> shift)

    def chunk_body(kb, carry):
        k0 = kb * bq
        key = k0 + jax.lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        valid = (key <= q_tok) & (key < clen)
        valid_col = k0 + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0) < clen
        kc, vc = fetch_chunk(k0, bq)
        kt = jnp.where(valid_col, kc.astype(jnp.float32), 0.0)
        vt = jnp.where(valid_col, vc.astype(jnp.float32), 0.0)
        return _online(carry, dot_nt(qw, kt), valid, lambda p: (dot_nn(p, vt),))

    n_kb = jnp.where(active, jnp.minimum(qb + 1, _cdiv(clen, bq)), 0).astype(jnp.int32)
    m2, l2, (acc2,) = jax.lax.fori_loop(jnp.int32(0), n_kb, chunk_body, carry)
    return m2, l2, acc2


N_SCALARS = 7  # layer, lengths, ring_lo, chunk lengths, window slots, page_lo, page table


def split_refs(refs: tuple, plan: RaggedPlan, kfmt: KeyFormat, vfmt: ValueFormat, n_q: int
               ) -> tuple:
    """The refs both launchers (Triton here, Mosaic in ragged_tpu.py) pass, by role: the
    N_SCALARS scalars, the query leaves, (window queries, chunk K, chunk V), the K and V page
    leaves, the ring's (K, V) ((None, None) without a window), the accumulated outputs, and
    what follows them (the launcher's own outputs and scratch)."""
    scalars, rest = refs[:N_SCALARS], refs[N_SCALARS:]
    q_refs, rest = rest[:n_q], rest[n_q:]
    chunk, rest = rest[:3], rest[3:]
    k_refs, rest = rest[:kfmt.leaves], rest[kfmt.leaves:]
    v_refs, rest = rest[:vfmt.leaves], rest[vfmt.leaves:]
    ring = (None, None)
    if plan.window:
        ring, rest = rest[:2], rest[2:]
    n_acc = len(vfmt.acc_shapes(plan.rows))
    return scalars, q_refs, chunk, k_refs, v_refs, ring, rest[:n_acc], rest[n_acc:]


def _ring_lo(seg, layer, ctx_end, slots):
    """[B] first position of the ring part: the window's positions [ctx_end - W, ctx_end) from
    the last one whose ring tag does not match it (written by another sequence, or never)."""
    w = seg.window
    tags = seg.wpos[layer, slots]  # [B, W]
    lo = ctx_end - w
    j = jnp.arange(w)[None, :]
    pos = lo[:, None] + jnp.remainder(j - lo[:, None], w)  # the window position of entry j
    bad = (pos >= 0) & (pos < ctx_end[:, None]) & (tags != pos)
    last_bad = jnp.max(jnp.where(bad, pos + 1, 0), axis=1)
    return jnp.minimum(jnp.maximum(jnp.maximum(lo, 0), last_bad), ctx_end)


def _formats(seg):
    from kvjax.pallas_kernels import formats_for

    fmts = formats_for(seg)
    if fmts is None:
        raise ValueError(f"no Pallas kernel reads keys {seg.k_spec.method!r} / values "
                         f"{seg.v_spec.method!r}; use the XLA path")
    return fmts


@functools.partial(jax.jit, static_argnames=("backend", "q_block", "pages_per_block",
                                             "num_warps", "num_stages"))
def ragged_paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, seg,
                           layer: jax.Array, page_table: jax.Array, lengths: jax.Array,
                           q_positions: jax.Array, window_slots: jax.Array | None = None, *,
                           backend: str = "auto", q_block: int = 0, pages_per_block: int = 0,
                           num_warps: int = 0, num_stages: int = 2) -> jax.Array:
    """Attention of a step's chunks (prefill chunks and decode rows mixed) over one layer of any
    segment a decode kernel reads, with the full-precision-chunk rule (see the module doc).

    q: [batch, tokens, num_heads, head_dim]; k_new, v_new: [batch, tokens, kv_heads, head_dim]
    this step's keys (post-RoPE) and values as computed; seg: kvjax.cache.paged.Segment with
    this step already written; layer: int32 scalar within the segment; page_table: [batch,
    max_pages] int32; lengths: [batch] tokens valid after this step; q_positions: [batch,
    tokens] contiguous from each row's start; window_slots: [batch] (segments with a window).
    Returns [batch, tokens, num_heads, head_dim] in q's dtype (rows past a sequence's length:
    padding, unspecified but finite).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown ragged backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        def branch(name):
            def run(q, k_new, v_new, seg, layer, page_table, lengths, q_positions, slots):
                return ragged_paged_attention(
                    q, k_new, v_new, seg, layer, page_table, lengths, q_positions, slots,
                    backend=name, q_block=q_block, pages_per_block=pages_per_block,
                    num_warps=num_warps, num_stages=num_stages)
            return run

        branches = {p: branch(n) for p, n in AUTO.items()}
        return jax.lax.platform_dependent(q, k_new, v_new, seg, layer, page_table, lengths,
                                          q_positions, window_slots, default=branches["cpu"],
                                          **branches)
    kfmt, vfmt = _formats(seg)
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, tokens, num_heads, head_dim], got {q.shape}")
    bsz, t, nh, d = q.shape
    leaf = seg.k[0]
    hkv, n_pages, s = leaf.shape[1], leaf.shape[2], seg.k_spec.page_size
    if k_new.shape != (bsz, t, hkv, d) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new, v_new must be [batch={bsz}, tokens={t}, kv_heads={hkv}, "
                         f"head_dim={d}], got {k_new.shape}, {v_new.shape}")
    if d != seg.k_spec.head_dim or nh % hkv:
        raise ValueError(f"q [.., {nh} heads, {d}] does not fit the cache's {hkv} KV heads of "
                         f"head_dim {seg.k_spec.head_dim}")
    if page_table.ndim != 2 or page_table.shape[0] != bsz:
        raise ValueError(f"page_table must be [batch={bsz}, max_pages], got {page_table.shape}")
    if lengths.shape != (bsz,) or q_positions.shape != (bsz, t):
        raise ValueError(f"lengths must be [{bsz}] and q_positions [{bsz}, {t}], got "
                         f"{lengths.shape}, {q_positions.shape}")
    w = seg.window
    if w and (window_slots is None or window_slots.shape != (bsz,)):
        raise ValueError(f"a segment with a window needs window_slots [batch={bsz}]")
    for name, val in (("page_size", s), ("head_dim", d), ("window", w or 1)):
        if val & (val - 1):
            raise ValueError(f"the ragged kernel needs a power-of-two {name}, got {val}")

    g = nh // hkv
    gpow = _pow2_at_least(g)
    tpu = backend in ("tpu", "interpret_tpu")
    if not tpu:  # Triton / interpret: channel-order tiles where phases would be <= 16 columns
        kfmt, vfmt = kfmt.gather_form(), vfmt.gather_form()
    tokens, warps = triton_tuning(kfmt, vfmt, d, ragged=True)
    # Query rows per program: Triton 32, 16 for KIVI / TurboQuant (their unpacked phases and
    # centroid selects already fill the registers: 32 rows spilled on H100), >= 16 for the dots;
    # TPU one 128-row MXU tile (VMEM holds the tiles, not registers), >= 8 tokens so the chunk's
    # key blocks start on a sublane tile.
    heavy = any(n in type(f).__name__ for f in (kfmt, vfmt) for n in ("Kivi", "Turbo"))
    rows = (TPU_ROWS_HEAVY if heavy else TPU_ROWS) if tpu else 16 if heavy else 32
    bq = q_block or max(1, rows // gpow)
    bq = min(bq, _pow2_at_least(t))
    while bq * gpow < 16 or (tpu and not q_block and bq < 8):
        bq *= 2
    tp = _pow2_at_least(max(t, bq))
    n_qb = tp // bq
    mp = page_table.shape[1]
    if tpu:  # one page per grid step, fetched by its BlockSpec (ragged_tpu)
        ppb, sub, mpp = 1, 1, mp
    else:
        ppb = pages_per_block or max(1, tokens // s)
        sub = s // tokens if (not pages_per_block and tokens < s and kfmt.per_token_rows
                              and vfmt.per_token_rows) else 1
        ppb = min(ppb, _pow2_at_least(mp))
        mpp = _pow2_at_least(-(-mp // ppb) * ppb)
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, mpp - mp)))
    plan = RaggedPlan(kv_heads=hkv, num_pages=n_pages, page_size=s, head_dim=d, gpow=gpow,
                      q_block=bq, pages_per_block=ppb, sub_blocks=sub, window=w,
                      ring_slots=seg.wk.shape[2] if w else 0)

    lengths = lengths.astype(jnp.int32)
    start = q_positions[:, 0].astype(jnp.int32)
    clen = jnp.clip(lengths - start, 0, t)  # the chunk's real tokens
    ctx_end = start
    # Sink without a window, no slots given: slot 0, as the XLA path (kvjax.attention) takes.
    slots = (jnp.zeros((bsz,), jnp.int32) if window_slots is None
             else window_slots.astype(jnp.int32))
    ring_lo = _ring_lo(seg, layer, ctx_end, slots) if w else ctx_end
    page_lo = sink_page_lo(seg, layer, slots) if seg.sinks else jnp.zeros((bsz,), jnp.int32)

    # Queries: [B, T, Hkv, G, D] -> [B, Hkv, n_qb, bq * gpow, D] (row = token * gpow + head).
    qg = q.reshape(bsz, t, hkv, g, d).astype(jnp.float32) * (d ** -0.5)
    qg = jnp.pad(qg, ((0, 0), (0, tp - t), (0, 0), (0, gpow - g), (0, 0)))
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(bsz, hkv, n_qb, bq * gpow, d)
    layer = jnp.asarray(layer, jnp.int32)
    # Calibrated TurboQuant pools take their layer's channel order / key mean (the formats'
    # *_layer methods, where a format has them); the ring and the chunk stay in channel order.
    prep = getattr(kfmt, "prepare_q_layer", None)
    qs = prep(qg, layer) if prep is not None else kfmt.prepare_q(qg)

    def chunk(x):  # [B, T, Hkv, D] -> [B, Hkv, Tp, D], as computed (bf16 on accelerators)
        return jnp.pad(jnp.moveaxis(x, 2, 1), ((0, 0), (0, 0), (0, tp - t), (0, 0)))

    ring = tuple(kernel_leaf(seg, x, layer, tpu, ring=True) for x in (seg.wk, seg.wv)) if w else ()
    k_leaves = tuple(kernel_leaf(seg, x, layer, tpu, key=True) for x in seg.k)
    v_leaves = tuple(kernel_leaf(seg, x, layer, tpu) for x in seg.v)
    scalars = (lengths, ring_lo, clen, slots, page_lo)
    if tpu:
        from kvjax.pallas_kernels import ragged_tpu

        # The chunk in f32 (exact for bf16): Mosaic slices 32-bit rows at any multiple of 8.
        outs = ragged_tpu.launch(plan, kfmt, vfmt, qs, qg, chunk(k_new).astype(jnp.float32),
                                 chunk(v_new).astype(jnp.float32), k_leaves, v_leaves, ring,
                                 layer, scalars, pt,
                                 interpret=backend == "interpret_tpu")
    else:
        from kvjax.pallas_kernels import ragged_triton

        outs = ragged_triton.launch(plan, kfmt, vfmt, qs, qg, chunk(k_new), chunk(v_new),
                                    k_leaves, v_leaves, ring, layer, scalars, pt, backend=backend,
                                    num_warps=num_warps or ragged_triton.warps_for(
                                        kfmt, warps, plan.rows, d),
                                    num_stages=num_stages)
    n_acc = len(vfmt.acc_shapes(plan.rows))
    accs, (m1, l1, acc2, m2, l2) = outs[:n_acc], outs[n_acc:]
    if seg.sinks:  # the exact sink [0, min(page_lo, ring_lo)), merged into the plain part
        acc_s, m_s, l_s, _ = sink_part(seg, layer, qg.reshape(bsz, hkv, n_qb * bq * gpow, d),
                                       slots, jnp.minimum(page_lo, ring_lo))
        acc2, m2, l2 = merge_parts((acc2, m2, l2), tuple(
            x.reshape(bsz, hkv, n_qb, bq * gpow, -1) for x in (acc_s, m_s, l_s)))
    big = jnp.maximum(m1, m2)
    w1, w2 = jnp.exp(m1 - big), jnp.exp(m2 - big)
    fin = getattr(vfmt, "finalize_layer", None)
    paged = fin(tuple(accs), layer) if fin is not None else vfmt.finalize(tuple(accs))
    out = (paged * w1 + acc2 * w2) / jnp.maximum(l1 * w1 + l2 * w2, 1e-30)
    out = out.reshape(bsz, hkv, tp, gpow, d)[:, :, :t, :g]  # [B, Hkv, T, G, D]
    return out.transpose(0, 2, 1, 3, 4).reshape(bsz, t, nh, d).astype(q.dtype)
