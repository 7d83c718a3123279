"""Every decode-kernel case compiles for TPU v5e and v6e with libtpu's compile-only client (no
TPU needed): the check `python -m kvjax.bench.compile --target tpu-v5e --target tpu-v6e` runs,
one case per process, two at a time. Skipped when the compile extra (libtpu) is not installed.

Cases listed in TPU_GAPS do not compile yet; the test fails if one of them starts compiling (so
the list only shrinks) or if any other case stops compiling.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvjax.bench.compile import run_one
from kvjax.bench.compile_case import default_cases

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not importable: pip install -e ".[compile]"')

TARGETS = ("tpu-v5e", "tpu-v6e")
# dtype -> why Mosaic rejects it today (strided lane loads of 8/16-bit data: 3-bit code groups,
# KIVI's per-channel key scales read in phase order).
TPU_GAPS = {
    "kivi2": "Strided load with non 32-bit data (per-channel key scale/zero in phase order)",
    "kivi4": "Strided load with non 32-bit data (per-channel key scale/zero in phase order)",
    "turbo2.5": "Strided load with non 32-bit data (3-bit code groups)",
    "turbo3": "Strided load with non 32-bit data (3-bit code groups)",
    "turbo3.5": "Strided load with non 32-bit data (3-bit code groups)",
    "turbo4": "Strided load with non 32-bit data (3-bit first stage of prod keys)",
}


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], dict]:
    work = [(t, c.name) for t in TARGETS for c in default_cases()]
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(lambda tc: run_one(*tc, timeout=300), work))
    return {(r["target"], r["case"]): r for r in out}


@needs_libtpu
@pytest.mark.parametrize("target", TARGETS)
def test_every_case_compiles_for_tpu(results, target):
    bad, fixed = [], []
    for c in default_cases():
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
