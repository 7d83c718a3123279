"""Token-granular eviction: the policy picks single tokens, BlockManager.drop_tokens + compact
move the kept tokens' codes, metadata and attention mass bit for bit, and a long generation with
StreamingLLM and H2O at token granularity equals a dense reference that drops the same tokens
(same kept tokens, same absolute positions) on every dtype family."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import init_cache
from kvjax.cache.block_manager import BlockManager
from kvjax.cache.compact import compact, eviction_unit
from kvjax.cache.paged import absolute_positions, with_attention_mass
from kvjax.config import load_config
from kvjax.engine.eviction import EvictionConfig, tokens_to_drop
from tests.test_eviction import DenseEvictingModel, generate_against_reference


def test_tokens_to_drop_keeps_sinks_window_and_heaviest():
    s = EvictionConfig("streaming", sink_tokens=3, window=5, granularity="token")
    assert tokens_to_drop(s, 14, 1, 8) == []  # 6 excess < one page: wait
    assert tokens_to_drop(s, 16, 1, 8) == list(range(3, 11))  # 8 excess: the oldest go
    h = EvictionConfig("h2o", sink_tokens=2, window=4, heavy_tokens=3, granularity="token")
    scores = np.zeros(20)
    scores[[5, 9, 13]] = [3.0, 2.0, 1.0]  # the heavy hitters among candidates [2, 16)
    scores[17] = 99.0  # inside the recent window: kept anyway, never counted as heavy
    drop = tokens_to_drop(h, 20, 1, 8, lambda: scores)
    assert drop == [t for t in range(2, 16) if t not in (5, 9, 13)]
    # Ties (all zero mass): the newest candidates stay, as at page granularity.
    assert tokens_to_drop(h, 20, 1, 8, np.zeros(20)) == list(range(2, 13))
    # Units of a page (KIVI) are page granularity exactly.
    assert tokens_to_drop(s, 40, 8, 8) == list(range(8, 32))


@pytest.mark.parametrize("dtype", ["bf16", "turbo3.5"])
def test_compaction_moves_codes_metadata_and_mass_bit_for_bit(dtype):
    cfg = load_config("tiny_llama").replace_cache(dtype=dtype, page_size=8, window=0)
    ps, n = 8, 37
    cache = with_attention_mass(init_cache(cfg.model, cfg.cache, num_pages=12))
    assert eviction_unit(cache) == 1
    bm = BlockManager(12, ps, enable_prefix_caching=True)
    table = list(bm.ensure(1, n))
    bm.commit(1, list(range(n)))  # pages 0-3 hashed: the prefix cache may hand them out
    bm.fork(1, 2, 8)  # sequence 2 shares page 0
    bm.ensure(2, 9)
    rng = np.random.default_rng(0)
    # Random words in every leaf (codes, scales, norms alike) and random mass.
    segs = []
    for seg in cache.segments:
        k = tuple(jnp.asarray(rng.integers(0, 200, leaf.shape), leaf.dtype) for leaf in seg.k)
        v = tuple(jnp.asarray(rng.integers(0, 200, leaf.shape), leaf.dtype) for leaf in seg.v)
        segs.append(seg.replace(k=k, v=v, mass=jnp.asarray(rng.random(seg.mass.shape),
                                                          jnp.float32)))
    cache = cache.replace(segments=tuple(segs))
    before = [([np.asarray(x) for x in seg.k + seg.v], np.asarray(seg.mass))
              for seg in cache.segments]
    other = list(bm.pages(2))
    drop = [1, 2, 3, 10, 11, 17, 20, 21, 22, 23, 24, 25, 26]
    moves = bm.drop_tokens(1, drop, n)
    cache = compact(cache, *moves)
    kept = [t for t in range(n) if t not in drop]
    now = bm.pages(1)
    assert len(now) == -(-len(kept) // ps) and bm.evicted(1) == len(drop)
    # Copy on write: the shared page and the hashed pages were replaced, never written.
    assert now[0] != table[0] and bm.pages(2) == other and not set(now) & set(table[:4])
    bm.check()
    for seg, (leaves, mass) in zip(cache.segments, before, strict=True):
        for new, old in zip(seg.k + seg.v, leaves, strict=True):
            new = np.asarray(new)
            for j, t in enumerate(kept):  # token t now sits at cache position j
                np.testing.assert_array_equal(new[:, :, now[j // ps], j % ps],
                                              old[:, :, table[t // ps], t % ps])
            np.testing.assert_array_equal(new[:, :, table[:4]], old[:, :, table[:4]])
            np.testing.assert_array_equal(new[:, :, other], old[:, :, other])
        m = np.asarray(seg.mass)
        for j, t in enumerate(kept):
            np.testing.assert_array_equal(m[now[j // ps], :, j % ps],
                                          mass[table[t // ps], :, t % ps])
    # Each kept token keeps its absolute position; new tokens continue after the evicted ones.
    width = 6
    pos = bm.page_positions([1, None], width)
    assert pos.shape == (2, width * ps)
    np.testing.assert_array_equal(pos[0, :len(kept)], kept)
    np.testing.assert_array_equal(pos[0, len(kept):], np.arange(len(kept), width * ps)
                                  + len(drop))
    np.testing.assert_array_equal(pos[1], np.arange(width * ps))
    got = absolute_positions(jnp.asarray(pos), jnp.asarray([[0, 5, len(kept)]] * 2), ps, width)
    np.testing.assert_array_equal(np.asarray(got), [[0, kept[5], n], [0, 5, len(kept)]])


class TokenEvictingModel(DenseEvictingModel):
    """The dense reference, dropping single tokens by `tokens_to_drop` on its own mass (a KIVI
    cache: whole pages, as the engine does)."""

    def evict(self) -> None:
        unit = self.ps if any(s.group > 1 for s in self.specs) else 1
        if unit == self.ps:
            return super().evict()
        drop = tokens_to_drop(self.ecfg, len(self.abs), unit, self.ps, self.mass)
        keep = np.ones(len(self.abs), bool)
        keep[drop] = False
        self.k, self.v = [k[keep] for k in self.k], [v[keep] for v in self.v]
        self.kq, self.vq = [k[keep] for k in self.kq], [v[keep] for v in self.vq]
        self.abs, self.mass = self.abs[keep], self.mass[keep]
        self.tokens = [t for t, m in zip(self.tokens, keep, strict=True) if m]
        self.evicted += int((~keep).sum())


DTYPES = [("bf16", {}), ("fp8", {"window": 16}), ("kivi4", {"window": 32}),
          ("turbo3.5", {"window": 16})]


@pytest.mark.parametrize("dtype,extra", DTYPES, ids=[d for d, _ in DTYPES])
def test_token_eviction_generation_equals_a_dense_reference(dtype, extra):
    """StreamingLLM and H2O at token granularity (one batch), several times their budget: the
    engine keeps exactly the reference's tokens at the reference's absolute positions, and each
    greedy token is the reference's argmax (teacher-forced on the engine's tokens)."""
    reqs, refs, kivi = generate_against_reference(dtype, extra, 7, "token", TokenEvictingModel)
    for ref, req in zip(refs, reqs, strict=True):
        if not kivi:  # single tokens went: some page of the text is kept in part
            counts = np.bincount(ref.abs[:-16] // 8)  # (the last 16 may be partly written)
            assert ((counts > 0) & (counts < 8)).any(), req.request_id
    a, b = reqs
    assert a.cache_tokens != b.cache_tokens  # H2O keeps other tokens than StreamingLLM
