"""The exact attention sink (CacheConfig.sink_tokens, kvjax/cache/paged.py): the first tokens of
each sequence kept in bf16 beside the compressed pages, tagged per ring slot.

Cache writes, tags and reset; the XLA path against a dense reference (sink tokens exact, the rest
dequantized from the pages); the decode and ragged kernels (both launchers, interpret mode)
against the XLA path, with rows whose sink is stale or incomplete (pages serve them); the bytes
the planner counts against the bytes stored; and a tiny model's decoding through the kernels
against the XLA path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import check_output_and_mass, make_case
from test_ragged import make_step

import models
from kvjax.attention import attend, gather_kv
from kvjax.attention import paged_attention as xla_attention
from kvjax.cache.paged import (
    init_cache,
    reset_window_slot,
    sink_bytes_per_sequence,
    sink_page_lo,
    window_bytes_per_sequence,
    write_layer,
)
from kvjax.config import CacheConfig, ModelConfig, load_config
from kvjax.pallas_kernels import ragged_attention
from kvjax.runner import Runner

MC = ModelConfig(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=64, hidden_size=64,
                 intermediate_size=64, vocab_size=32)


def _bits(x) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16))


def test_sink_write_tags_and_reset():
    """Tokens at absolute positions [0, sinks) of rows that own them land in their slot's sink as
    bf16, tagged with their position; a padding row and tokens past the sink write nothing; a
    decode step leaves the sink alone; reset clears one slot's tags only."""
    cc = CacheConfig(dtype="turbo4", page_size=8, window=8, sink_tokens=2)
    seg = init_cache(MC, cc, num_pages=12, num_slots=3).segments[0]
    assert seg.sinks == 2 and seg.sk.shape == (2, 2, 4, 2, 64) and seg.spos.shape == (2, 4, 2)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 8, 2, 64)).astype(np.float32)
    v = rng.standard_normal((3, 8, 2, 64)).astype(np.float32)
    pos = np.array([np.arange(8), np.arange(8), np.arange(3, 11)], np.int32)
    lengths = np.array([5, 0, 11], np.int32)  # row 1 is padding; row 2 starts at position 3
    pt = np.array([[1, 2], [0, 0], [3, 4]], np.int32)
    slots = np.array([2, 0, 1], np.int32)
    seg = write_layer(seg, jnp.int32(1), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos),
                      jnp.asarray(lengths), jnp.asarray(pt), jnp.asarray(slots))
    sk, sv, spos = np.asarray(seg.sk), np.asarray(seg.sv), np.asarray(seg.spos)
    np.testing.assert_array_equal(sk[1, :, 2], _bits(k[0, :2]).transpose(1, 0, 2))
    np.testing.assert_array_equal(sv[1, :, 2], _bits(v[0, :2]).transpose(1, 0, 2))
    np.testing.assert_array_equal(spos[1, :3], [[-1, -1], [-1, -1], [0, 1]])
    assert (spos[0] == -1).all() and not sk[0].any()  # layer 0 untouched
    np.testing.assert_array_equal(sink_page_lo(seg, jnp.int32(1), jnp.asarray(slots)), [2, 0, 0])
    # A decode step at position 5 of row 0: its sink stays as it was.
    seg = write_layer(seg, jnp.int32(1), jnp.asarray(k[:1, :1] + 1), jnp.asarray(v[:1, :1]),
                      jnp.asarray([[5]], jnp.int32), jnp.asarray([6], jnp.int32),
                      jnp.asarray(pt[:1]), jnp.asarray(slots[:1]))
    np.testing.assert_array_equal(np.asarray(seg.sk)[:, :, :3], sk[:, :, :3])  # 3: the spare
    cache = init_cache(MC, cc, num_pages=12, num_slots=3)
    cache = cache.replace(segments=(seg.replace(spos=jnp.zeros_like(seg.spos)),))
    spos = np.asarray(reset_window_slot(cache, jnp.int32(2)).segments[0].spos)
    assert (spos[:, 2] == -1).all() and (spos[:, [0, 1, 3]] == 0).all()


@pytest.mark.parametrize("window", [0, 8])
def test_xla_sink_equals_dense_reference(window):
    """Decode rows through the XLA path with a 1-token sink equal dense attention over the
    dequantized pages with position 0 replaced by its bf16 key and value (the ring's last
    positions exact as before); and differ from the sink-less cache (the test can fail)."""
    cc = CacheConfig(dtype="turbo4", page_size=8, window=window, sink_tokens=1)
    seg = init_cache(MC, cc, num_pages=16, num_slots=2).segments[0]
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 40, 2, 64)).astype(np.float32)
    v = rng.standard_normal((2, 40, 2, 64)).astype(np.float32)
    k[:, 0] *= 6.0  # a long sink key: its 4-bit error moves the softmax
    lengths = np.array([40, 29], np.int32)
    pt = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]], np.int32)
    slots = np.array([1, 0], np.int32)
    pos = np.tile(np.arange(40, dtype=np.int32), (2, 1))
    layer = jnp.int32(0)
    seg = write_layer(seg, layer, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos),
                      jnp.asarray(lengths), jnp.asarray(pt), jnp.asarray(slots))
    plain = seg.replace(sk=None, sv=None, spos=None)
    kp, vp = gather_kv(plain, layer, jnp.asarray(pt), jnp.asarray(lengths), jnp.asarray(slots))
    kp, vp = np.array(kp), np.array(vp)  # [hkv, b, L, d]
    kp[:, :, 0] = np.asarray(jnp.asarray(k[:, 0], jnp.bfloat16).astype(jnp.float32)
                             ).transpose(1, 0, 2)
    vp[:, :, 0] = np.asarray(jnp.asarray(v[:, 0], jnp.bfloat16).astype(jnp.float32)
                             ).transpose(1, 0, 2)
    q = jnp.asarray(rng.standard_normal((2, 1, 6, 64)).astype(np.float32))
    qpos = jnp.asarray(lengths - 1)[:, None]
    args = (jnp.asarray(pt), jnp.asarray(lengths), qpos, jnp.asarray(slots))
    ref = attend(q, jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(lengths), qpos)
    got = xla_attention(q, seg, layer, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6, rtol=1e-5)
    without = xla_attention(q, plain, layer, *args)
    assert np.abs(np.asarray(without) - np.asarray(ref)).max() > 1e-3


def _stale(seg, slot: int, nan: bool = True):
    """A row whose sink tags do not all match (a prefix hit / a reused slot): its sink entry
    1 untagged and every sink entry NaN, so reading it would show."""
    seg = seg.replace(spos=seg.spos.at[:, slot, 1].set(-1))
    if nan:
        seg = seg.replace(sk=seg.sk.at[:, :, slot].set(0xFFFF),
                          sv=seg.sv.at[:, :, slot].set(0xFFFF))
    return seg


@pytest.mark.parametrize("backend", ["interpret", "interpret_tpu"])
@pytest.mark.parametrize("dtype,window", [("turbo4", 32), ("int4", 0)])
def test_decode_kernel_with_sink_equals_xla(backend, dtype, window):
    """Rows: a full page table (sink served), a short row (length < window: the ring covers the
    sink; or shorter than the sink), a row whose sink is stale (NaN, pages serve it). Output and
    H2O mass equal the XLA path's."""
    q, seg, pt, lens, slots = make_case(dtype, d=64, g=3, page_size=16, window=window,
                                        lengths=[96, 1, 70], sinks=2)
    seg = _stale(seg, int(slots[2]))
    layer = jnp.int32(1)
    assert np.asarray(sink_page_lo(seg, layer, slots)).tolist() == [2, 0, 0]
    ref = check_output_and_mass(q, seg, layer, pt, lens, slots, backend)
    # The sink is used: the same cache without it reads position 0 from the pages.
    plain = xla_attention(q, seg.replace(sk=None, sv=None, spos=None), layer, pt, lens,
                          (lens - 1)[:, None], slots)
    assert np.abs(np.asarray(plain[0]) - np.asarray(ref[0])).max() > 1e-5


@pytest.mark.parametrize("backend", ["interpret", "interpret_tpu"])
def test_ragged_kernel_with_sink_equals_xla(backend):
    """A step mixing a fresh prefill chunk, a decode row, chunks after a context and after a
    prefix hit, with a 2-token sink (row 2's stale): equals the XLA full-precision-chunk rule."""
    q, kn, vn, seg, pt, lens, pos, slots = make_step("turbo4", d=64, g=3, page_size=16,
                                                     window=16, sinks=2, seed=3)
    seg = _stale(seg, int(slots[2]))
    layer = jnp.int32(1)
    ref = xla_attention(q, seg, layer, pt, lens, pos, slots, chunk_kv=(kn, vn))
    out = ragged_attention.ragged_paged_attention(q, kn, vn, seg, layer, pt, lens, pos, slots,
                                                  backend=backend)
    valid = np.asarray(pos < lens[:, None])
    assert not np.isnan(np.asarray(ref)[valid]).any()
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=2e-5,
                               rtol=1e-5)
    assert np.asarray(sink_page_lo(seg, layer, slots))[1] == 2  # the decode row reads its sink


def test_bytes_per_sequence_equal_stored_bytes():
    """The planner's per-sequence bytes (window_bytes_per_sequence, memory.py, the engine's
    planner) count the sink: bf16 K and V and the tags, per slot, for quantized layers only."""
    cc = CacheConfig(dtype="turbo3", page_size=16, window=16, sink_tokens=3, bf16_layers=(0,))
    mc = dataclasses.replace(MC, num_layers=3)
    cache = init_cache(mc, cc, num_pages=5, num_slots=4)
    stored = sum(x.nbytes for seg in cache.segments for x in (seg.sk, seg.sv, seg.spos)
                 if x is not None)
    assert [seg.sinks for seg in cache.segments] == [0, 3]
    assert sink_bytes_per_sequence(mc, cc) * 5 == stored  # 4 slots + the padding slot
    off = dataclasses.replace(cc, sink_tokens=0)
    assert window_bytes_per_sequence(mc, cc) - window_bytes_per_sequence(mc, off) == stored // 5


def test_tiny_model_kernels_with_sink_equal_xla():
    """A tiny model with a 1-token sink and an 8-token window (turbo4): prefill chunks (the
    ragged kernel) then decode steps (the decode kernel) give the XLA path's logits; the sink
    is tagged after the prompt and changes the logits."""
    base = load_config("tiny_llama")
    params = models.random_params(base.model, seed=2)
    prompt = [int(t) for t in np.random.default_rng(4).integers(0, 256, 30)]

    def run(impl: str, sinks: int) -> np.ndarray:
        cfg = dataclasses.replace(base.replace_cache(dtype="turbo4", window=8,
                                                     sink_tokens=sinks), attention_impl=impl)
        r = Runner(cfg, params, max_seq_len=40)
        out = [r.prefill(0, prompt, chunk=16)]
        if sinks:
            assert all(np.asarray(seg.spos[:, r.window_slot[0]] == 0).all()
                       for seg in r.cache.segments if seg.sinks)
        for _ in range(4):
            out.append(r.step([0], [[int(np.argmax(np.asarray(out[-1])))]])[0, 0])
        return np.stack([np.asarray(x) for x in out])

    xla = run("xla", 1)
    np.testing.assert_allclose(run("pallas", 1), xla, atol=1e-4, rtol=1e-4)
    assert np.abs(run("xla", 0) - xla).max() > 1e-4
