"""Every decode-kernel case compiles for TPU v5e and v6e with libtpu's compile-only client (no
TPU needed), as `python -m kvjax.bench.compile --target tpu-v5e --target tpu-v6e` does, one
case per process, two at a time (each case on one of the two targets; see cases_for). Skipped
when the compile extra (libtpu) is not installed.

Cases listed in TPU_GAPS do not compile yet; the test fails if one of them starts compiling (so
the list only shrinks) or if any other case stops compiling.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvjax.bench.compile import run_one
from kvjax.bench.compile_case import default_cases

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not importable: pip install -e ".[compile]"')

TARGETS = ("tpu-v5e", "tpu-v6e")
# dtype -> why Mosaic rejects it today (empty: every default case compiles on v5e and v6e).
TPU_GAPS: dict[str, str] = {}


def cases_for(target: str) -> list:
    """CI time: each default case is compiled on one of the two targets (v5e takes the d64 case
    of every other dtype and the d128 case of the rest, v6e the opposite), 24 compiles in all;
    KVJAX_COMPILE_ALL=1 compiles all of them on both."""
    cases = default_cases()
    if os.environ.get("KVJAX_COMPILE_ALL") == "1":
        return cases
    side = TARGETS.index(target)
    return [c for i, c in enumerate(cases) if (i + i // 2) % 2 == side]


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], dict]:
    work = [(t, c.name) for t in TARGETS for c in cases_for(t)]
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(lambda tc: run_one(*tc, timeout=300), work))
    return {(r["target"], r["case"]): r for r in out}


@needs_libtpu
@pytest.mark.parametrize("target", TARGETS)
def test_every_case_compiles_for_tpu(results, target):
    bad, fixed = [], []
    for c in cases_for(target):
        r = results[(target, c.name)]
        if c.dtype in TPU_GAPS:
            if r.get("ok"):
                fixed.append(c.name)
        elif not r.get("ok") or r.get("kernel_calls", 0) < 1:
            bad.append(f"{c.name}: {r.get('error')}")
    assert not bad, f"{target}: cases that do not compile:\n" + "\n".join(bad)
    assert not fixed, f"{target}: these now compile, remove them from TPU_GAPS: {fixed}"


def test_missing_extra_is_one_line(monkeypatch):
    """Without libtpu / the CUDA plugin the driver names the extra instead of a traceback."""
    from kvjax.bench import compile as driver

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    for target in ("tpu-v5e", "h100"):
        msg = driver.check_extra(target)
        assert msg and ".[compile]" in msg and "\n" not in msg
    assert driver.main(["--target", "tpu-v6e"]) == 2
