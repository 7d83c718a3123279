"""Pallas kernels over the paged, compressed KV cache (GPU via Triton, TPU via Mosaic, CPU via
interpret mode). One file per op:

  paged_decode.py           decode attention over bf16 / f32 / fp8 / int8 / int4 pages
  kivi_attention.py         decode attention over KIVI 2/4-bit pages + the full-precision window
  turboquant_attention.py   decode attention over TurboQuant pages (mse or prod keys, mse
                            values; calibrated pools: keys centred / channels reordered per
                            layer and KV head)
  ragged_attention.py       prefill chunks and decode rows in one call (the chunk's own keys
                            and values at full precision)
  ragged_tpu.py             its TPU (Mosaic) launcher
  _core.py                  decode entry point, split-KV combine, attention mass (re-exports
                            _formats, _launch and _pallas_call)
  _formats.py               tile helpers, packed-code phases, the key / value format interface
  _launch.py                decode kernel bodies (gather: Triton / interpret; tpu: Mosaic)
  _pallas_call.py           the two launchers' pallas_calls (grids, BlockSpecs, outputs)
  compat.py                 Pallas API differences between jax 0.10 and 0.11

New tokens' codes are written by the cache's own write path (kvjax/cache/layout.py), in XLA.

``paged_attention`` below picks the key and value formats of any segment (mixed forms such as
k8v4 / k8v4turbo included) and runs one kernel; the reference is kvjax.attention (XLA path).
"""

from __future__ import annotations

import functools

import jax

from kvjax.pallas_kernels import _core, kivi_attention, paged_decode, turboquant_attention
from kvjax.pallas_kernels._core import BACKENDS
from kvjax.pallas_kernels.ragged_attention import ragged_paged_attention  # noqa: F401

_FAMILIES = (paged_decode, kivi_attention, turboquant_attention)


def formats_for(seg):
    """(key format, value format) for a segment, or None when a kernel cannot read it."""
    key = value = None
    for fam in _FAMILIES:
        try:
            kf = fam.formats(seg.k_spec)
            vf = fam.formats(seg.v_spec)
        except NotImplementedError:
            return None
        if kf is not None and kf[0] is not None and key is None:
            key = kf[0]
        if vf is not None and vf[1] is not None and value is None:
            value = vf[1]
    if key is None or value is None:
        return None
    return key, value


def supports(seg) -> bool:
    """Whether the decode kernel reads this segment's pages (polar and 1-bit QJL keys do not)."""
    return formats_for(seg) is not None


@functools.partial(jax.jit, static_argnames=("backend", "k_splits", "pages_per_block",
                                             "num_warps", "num_stages", "with_mass"))
def paged_attention(q, seg, layer, page_table, lengths, window_slots=None, *,
                    backend: str = "auto", k_splits: int = 0, pages_per_block: int = 0,
                    num_warps: int = 0, num_stages: int = 2, with_mass: bool = False):
    """Decode attention of q [batch, 1, num_heads, head_dim] over one layer of any supported
    cache segment; see _core.decode for the arguments. Returns [batch, 1, num_heads, head_dim]
    (with_mass: and the H2O attention mass [batch, kv_heads, max_pages * page_size] f32)."""
    fmts = formats_for(seg)
    if fmts is None:
        raise ValueError(f"no Pallas kernel reads keys {seg.k_spec.method!r} / values "
                         f"{seg.v_spec.method!r}; use the XLA path")
    return _core.decode(q, seg, layer, page_table, lengths, window_slots, *fmts,
                        backend=backend, k_splits=k_splits, pages_per_block=pages_per_block,
                        num_warps=num_warps, num_stages=num_stages, with_mass=with_mass)


__all__ = ["BACKENDS", "formats_for", "paged_attention", "supports"]
