"""The page allocator as the Runner uses it (BlockManager, prefix caching off): random grow/free
sequences keep the free list consistent."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.cache import NULL_PAGE, BlockManager, OutOfPages

ops = st.lists(st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 4),
                         st.integers(1, 40)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(num_pages=st.integers(2, 24), page_size=st.sampled_from([1, 4, 16]), script=ops)
def test_no_page_leaked_or_owned_twice(num_pages, page_size, script):
    alloc = BlockManager(num_pages, page_size)
    tokens: dict[int, int] = {}
    for op, sid, n in script:
        if op == "grow":
            want = tokens.get(sid, 0) + n
            before = list(alloc.pages(sid))
            try:
                alloc.ensure(sid, want)
                tokens[sid] = want
            except OutOfPages:
                assert alloc.pages(sid) == before  # a failed grow allocates nothing
        else:
            alloc.free(sid)
            tokens.pop(sid, None)
        owned = [p for s in tokens for p in alloc.pages(s)]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert NULL_PAGE not in owned
        assert sorted(owned + alloc._free) == list(range(1, num_pages)), "a page leaked"
        for s, t in tokens.items():
            assert len(alloc.pages(s)) == -(-t // page_size)


def test_page_table_rows_point_unowned_entries_at_null_page():
    alloc = BlockManager(10, 4)
    alloc.ensure(7, 9)  # 3 pages
    alloc.ensure(3, 1)  # 1 page
    table = alloc.page_table([3, 7], max_pages=5)
    assert table.dtype == np.int32 and table.shape == (2, 5)
    assert list(table[1, :3]) == alloc.pages(7) and (table[1, 3:] == NULL_PAGE).all()
    assert table[0, 0] == alloc.pages(3)[0] and (table[0, 1:] == NULL_PAGE).all()
    with pytest.raises(ValueError):
        alloc.page_table([7], max_pages=2)
    with pytest.raises(OutOfPages):
        alloc.ensure(1, 100)
