"""BlockManager: reference counts, free list and prefix cache stay consistent under random
admit / grow / preempt / finish / share sequences; prefix hits return pages holding exactly the
requested tokens; eviction policies pick the right pages. Pure Python, no model."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.cache.block_manager import NULL_PAGE, BlockManager, OutOfPages, root_hash
from kvjax.engine.eviction import EvictionConfig, H2OScores, pages_to_drop

ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "preempt", "finish", "share"]),
                         st.integers(0, 5), st.integers(1, 20), st.integers(0, 3)),
               max_size=50)


@settings(max_examples=150, deadline=None)
@given(num_pages=st.integers(2, 20), page_size=st.sampled_from([1, 2, 4]),
       prefix=st.booleans(), script=ops)
def test_refcounts_and_free_list_stay_consistent(num_pages, page_size, prefix, script):
    bm = BlockManager(num_pages, page_size, "f32", enable_prefix_caching=prefix)
    tokens: dict[int, list[int]] = {}  # live sequences -> tokens written
    content: dict[int, dict[int, int]] = {}  # page -> slot -> token written there
    next_id = [100]

    def write(sid, start):
        table = bm.pages(sid)
        for pos in range(start, len(tokens[sid])):
            page = table[pos // page_size]
            assert bm.refcount[page] == 1, "writing into a shared page"
            content.setdefault(page, {})[pos % page_size] = tokens[sid][pos]

    for op, pick, n, vocab in script:
        live = sorted(tokens)
        sid = live[pick % len(live)] if live else None
        if op == "admit" or sid is None:
            new = next_id[0]
            next_id[0] += 1
            # Small alphabets and a shared stem make prefix hits common.
            prompt = [7] * (n // 2) + [(i * (vocab + 1)) % (vocab + 2) for i in range(n - n // 2)]
            hit = bm.match_prefix(new, prompt)
            assert hit % page_size == 0 and hit <= len(prompt) - 1
            for i, page in enumerate(bm.pages(new)):  # a hit holds exactly these tokens
                assert [content[page][s] for s in range(page_size)] == \
                    prompt[i * page_size:(i + 1) * page_size]
            if bm.can_grow(new, len(prompt)):
                bm.ensure(new, len(prompt))
                tokens[new] = prompt
                write(new, hit)
                bm.commit(new, prompt)
            else:
                before = bm.num_free
                with pytest.raises(OutOfPages):
                    bm.ensure(new, len(prompt))
                assert bm.num_free == before  # a failed grow allocates nothing
                bm.free(new)
        elif op == "grow":
            want = len(tokens[sid]) + n
            if bm.can_grow(sid, want):
                start = len(tokens[sid])
                bm.ensure(sid, want)
                tokens[sid] = tokens[sid] + [(vocab + i) % 5 for i in range(n)]
                write(sid, start)
                bm.commit(sid, tokens[sid])
        elif op in ("preempt", "finish"):
            if op == "finish":
                bm.commit(sid, tokens[sid])
            bm.free(sid)
            del tokens[sid]
        else:  # share: a child continues from the parent's full pages
            child = next_id[0]
            next_id[0] += 1
            bm.fork(sid, child, len(tokens[sid]))
            full = len(tokens[sid]) // page_size * page_size
            tokens[child] = tokens[sid][:full]
        bm.check()
        owned = [p for s in tokens for p in bm.pages(s)]
        assert NULL_PAGE not in owned
        for s, toks in tokens.items():
            table = bm.pages(s)
            assert len(table) == -(-len(toks) // page_size)
            for page in table[len(toks) // page_size:]:  # the partial page is private
                assert bm.refcount[page] == 1, "a page being written is owned twice"
    for s in list(tokens):
        bm.free(s)
    bm.check()
    assert bm.num_free == num_pages - 1, "a page leaked"


def test_prefix_hit_reuses_pages_and_lru_evicts_tail_first():
    bm = BlockManager(8, 4, "bf16", enable_prefix_caching=True)
    prompt = list(range(13))  # 3 full pages + 1 token
    assert bm.match_prefix(1, prompt) == 0
    bm.ensure(1, 13)
    bm.commit(1, prompt)
    pages = list(bm.pages(1))
    bm.free(1)  # cached, not free: all 3 full pages stay findable
    assert bm.num_free == 7 and bm.num_used == 0
    assert bm.match_prefix(2, prompt) == 12 and bm.pages(2) == pages[:3]
    bm.record_query(13, 12)
    assert (bm.prefix_queries, bm.prefix_hits) == (13, 12)
    bm.free(2)
    # A block-aligned prompt never hits its own last page (its last token must be computed).
    assert bm.match_prefix(3, prompt[:12]) == 8
    bm.free(3)
    # Pressure evicts cached pages, the tail of the chain first (reverse order on release).
    bm.ensure(4, 4 * 4)  # 4 free pages first
    assert bm.match_prefix(5, prompt) == 12
    bm.free(5)
    bm.ensure(4, 5 * 4)  # one more page: evicts page 3 of the chain
    assert bm.match_prefix(6, prompt) == 8
    bm.check()


def test_salt_and_cache_dtype_isolate_prefixes():
    assert root_hash("bf16", 16) != root_hash("fp8", 16)
    assert root_hash("bf16", 16, "tenant-a") != root_hash("bf16", 16, "tenant-b")
    bm = BlockManager(8, 4, "bf16", enable_prefix_caching=True)
    prompt = list(range(9))
    bm.match_prefix(1, prompt, salt="a")
    bm.ensure(1, 9)
    bm.commit(1, prompt, salt="a")
    assert bm.match_prefix(2, prompt, salt="b") == 0
    assert bm.match_prefix(3, prompt, salt="a") == 8
    assert bm.match_prefix(4, prompt) == 0


def test_streaming_drops_middle_pages_keeps_sinks_and_window():
    cfg = EvictionConfig("streaming", sink_tokens=4, window=8)
    assert pages_to_drop(cfg, 12, 4) == []  # sink page + 2 window pages
    assert pages_to_drop(cfg, 20, 4) == [1, 2]  # 5 full pages: keep 0 and the last 2
    assert pages_to_drop(cfg, 22, 4) == [1, 2]  # the partial page is never a candidate
    assert pages_to_drop(EvictionConfig(), 1000, 4) == []


def test_h2o_keeps_heavy_hitters():
    cfg = EvictionConfig("h2o", sink_tokens=4, window=8, heavy_tokens=4)
    scores = H2OScores(4)
    mass = np.zeros(28)
    mass[8:12] = 5.0  # page 2 is a heavy hitter
    mass[16:20] = 1.0
    scores.observe(mass)
    drop = pages_to_drop(cfg, 28, 4, scores.page_scores(7))
    # candidates: pages 1..4 (0 = sinks, 5-6 = window); 1 heavy page kept: the heaviest, page 2
    assert drop == [1, 3, 4]
    scores.drop(drop)
    assert scores.page_scores(4).tolist() == [0.0, 20.0, 0.0, 0.0]


def test_budget_cut_chunks_are_cut_at_a_chunk_bucket():
    """A chunk the step's budget cuts short runs unpadded (a bucket length); a request's last
    piece and chunks of at most 16 tokens keep their length."""
    from kvjax.engine.schedule import chunk_len
    from kvjax.runner import CHUNK_BUCKETS

    assert chunk_len(224, 256) == 128 and chunk_len(480, 1000) == 256
    assert chunk_len(63, 300) == 32 and chunk_len(65, 300) == 64 and chunk_len(31, 300) == 16
    assert chunk_len(200, 200) == 200 and chunk_len(10, 300) == 10 and chunk_len(0, 0) == 0
    for rest in range(1, 600, 7):
        for n in range(1, min(rest, 256) + 1):
            m = chunk_len(n, rest)
            assert 0 < m <= n and (m == rest or m in CHUNK_BUCKETS or m == n <= 16)
