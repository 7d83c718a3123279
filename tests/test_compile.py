"""Kernels compile for TPU v5e and v6e with libtpu's compile-only client (no TPU needed), and for
H100 with XLA's GPU compiler and ptxas, as `python -m kvjax.bench.compile` does: one case per
process, two at a time. The TPU tests are skipped when libtpu is not installed
(pip install -e ".[compile-tpu]"), the H100 test without the CUDA plugin and ptxas
(pip install -e ".[compile]" and a CUDA 13 toolkit).

CI time: CI_CASES puts every dtype's paged decode kernel on one TPU target and its ragged
prefill+decode kernel on the other (the cheaper head_dim of the driver's rotation), a
calibrated-TurboQuant case on each kernel and one attention-mass case, and two SmolLM2 steps (a
512-token prefill chunk and a turbo3.5 one-layer decode): ~180 s of compile CPU, ~2 min on 2 idle
cores. H100_CASES: every dtype's decode and ragged kernel at head_dim 128 (where registers run
out) and both calibrated kernels, checked for spills. KVJAX_COMPILE_ALL=1: the driver's whole
default table on every target.

Cases listed in TPU_GAPS do not compile yet; the test fails if one of them starts compiling (so
the list only shrinks) or if any other case stops compiling. The driver's table logic (bytes
accessed against bf16 x the KV byte ratio, model case names, the kernel-kind registry) is tested
without libtpu.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvjax.bench import compile as driver
from kvjax.bench.compile import run_one
from kvjax.bench.compile_case import (
    DEFAULT_KINDS,
    DTYPES,
    EXTRA_DEFAULT,
    KERNEL_KINDS,
    Case,
    default_cases,
    register_kinds,
)
from kvjax.bench.compile_model import parse as parse_model


def _found(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


needs_libtpu = pytest.mark.skipif(
    not _found("libtpu"), reason='libtpu is not importable: pip install -e ".[compile-tpu]"')
needs_cuda = pytest.mark.skipif(
    not _found("jax_plugins.xla_cuda13") or shutil.which("ptxas") is None,
    reason='no CUDA plugin or ptxas: pip install -e ".[compile]" and a CUDA 13 toolkit')

TARGETS = ("tpu-v5e", "tpu-v6e")
# dtype -> why Mosaic rejects it today (empty: every default case compiles on v5e and v6e).
TPU_GAPS: dict[str, str] = {}
# The CI subset (rotation cases of the default table; compile CPU seconds on this machine in
# brackets, from the session-3 tables): decode on one target and ragged on the other per dtype,
# the TurboQuant ragged cases on v5e (v6e's take 2-4x the CPU).
CI_CASES: dict[str, list[str]] = {
    "tpu-v5e": [
        "bf16-d128-g8-p32", "int8-d64-g8-p16", "k8v4-d64-g3-p16", "kivi4-d64-g3-p64",  # 1-4 s
        "turbo3-d128-g8-p16", "turbo4-d128-g3-p16",  # 3-4 s
        "ragged:fp8-d128-g1-p16", "ragged:int4-d128-g8-p16", "ragged:k8v4turbo-d128-g3-p16",
        "ragged:kivi2-d64-g1-p32",  # 2-5 s
        "ragged:turbo2.5-d64-g8-p16", "ragged:turbo3.5-d64-g3-p16",  # 23 s, 14 s
        "cal:turbo3.5-d64-g3-p16",  # 5 s
        # 18 s: the ragged kernel over a RoPE-centred calibration (SmolLM2's turbo3.5 prefill);
        # its value-order gather after the channel split's once kept libtpu's layout
        # assignment busy past 5 minutes
        "calragged:turbo3.5-d64-g3-p16",
        "model:smollm2-bf16-32768-p512",  # 6 s: the whole model, its chunk on the ragged kernel
    ],
    "tpu-v6e": [
        "fp8-d128-g1-p16", "int4-d128-g8-p16", "k8v4turbo-d128-g3-p16", "kivi2-d64-g1-p32",
        "turbo2.5-d64-g8-p16", "turbo3.5-d64-g3-p16",  # 3-5 s
        "ragged:bf16-d64-g1-p16", "ragged:int8-d64-g8-p16", "ragged:k8v4-d64-g3-p16",
        "ragged:kivi4-d128-g1-p32", "ragged:turbo3-d64-g1-p32", "ragged:turbo4-d128-g3-p16",
        "mass:int4-d128-g8-p16",  # 5 s
        "model:smollm2-turbo3.5-32768-l1",  # 15 s: a calibrated turbo3.5 decode step
    ],
}
# H100: every dtype at head_dim 128, decode and ragged (1-3.5 s each), for spills.
H100_CASES = ([c.name for c in default_cases() if c.head_dim == 128]
              + ["cal:turbo2.5-d128-g3-p32", "calragged:turbo2.5-d128-g3-p32",
                 "mass:int4-d128-g8-p16"])


def cases_for(target: str) -> list[str]:
    """The CI subset of the target; KVJAX_COMPILE_ALL=1: the driver's default table (and the
    subset's model steps)."""
    subset = H100_CASES if target == "h100" else CI_CASES[target]
    if os.environ.get("KVJAX_COMPILE_ALL") == "1":
        return ([c.name for c in default_cases()] + EXTRA_DEFAULT
                + [c for c in subset if c.startswith("model:")])
    return subset


def _compile_all(targets: tuple[str, ...]) -> dict[tuple[str, str], dict]:
    work = [(t, c) for t in targets for c in cases_for(t)]
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(lambda tc: run_one(*tc, timeout=600), work))
    return {(r["target"], r["case"]): r for r in out}


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], dict]:
    return _compile_all(TARGETS)


@needs_libtpu
@pytest.mark.parametrize("target", TARGETS)
def test_every_case_compiles_for_tpu(results, target):
    bad, fixed = [], []
    for name in cases_for(target):
        r = results[(target, name)]
        if name.startswith("model:"):
            continue  # test_model_steps_hold_the_kernel_on_tpu
        if Case.parse(name).dtype in TPU_GAPS:
            if r.get("ok"):
                fixed.append(name)
        elif not r.get("ok") or r.get("kernel_calls", 0) < 1:
            bad.append(f"{name}: {r.get('error')}")
        elif not 0 < r.get("vmem_bytes", 0) <= r.get("vmem_limit_bytes", 0):
            # the kernel's scoped VMEM, read from libtpu's log: present and within the limit
            bad.append(f"{name}: scoped VMEM {r.get('vmem_bytes')} of "
                       f"{r.get('vmem_limit_bytes')}")
    assert not bad, f"{target}: cases that do not compile:\n" + "\n".join(bad)
    assert not fixed, f"{target}: these now compile, remove them from TPU_GAPS: {fixed}"


@needs_libtpu
def test_model_steps_hold_the_kernel_on_tpu(results):
    steps = [(t, c) for t in TARGETS for c in cases_for(t) if c.startswith("model:")]
    assert steps
    for key in steps:
        r = results[key]
        assert r.get("ok") and r["kernel_calls"] >= 1, (key, r.get("error"))
        # XLA's bytes (the kernel's reads are not in them) and the kernel's reads of the pages
        # at least read the cache once
        assert r["bytes_accessed"] + r["kernel_read_bytes"] > r["cache_bytes"] > 0
        assert r["kv_bytes_per_token"] > 0
        # The pool is stored in the layout of the step's layer loop (kvjax/pool_formats.py, as
        # the Runner stores it): no copy of a pool code leaf, or of one layer of it, is left.
        # With XLA's default (pages-on-lanes) layout every step relayouted the pool in and out.
        assert r["pool_copy_count"] == 0, (key, r["pool_copy_bytes"])
        # No float buffer shaped like one KV head's whole context or more, besides the cache's
        # own leaves: the kernels read the pages compressed and the chunk is quantized as it is
        # written, so no step materializes a dequantized (bf16 / f32) copy of K/V
        # (compile_target.hlo_float_kv_buffers; an XLA-path gather_kv step has two per layer).
        assert r["dequant_count"] == 0, (key, r["dequant_bytes"], r["dequant_largest"])


@needs_cuda
def test_every_case_compiles_for_h100_without_spills():
    res = _compile_all(("h100",))
    bad = []
    for (_, name), r in res.items():
        if not r.get("ok") or r.get("kernel_calls", 0) < 1:
            bad.append(f"{name}: {r.get('error')}")
        elif r.get("spill_bytes", 0) > 0:
            bad.append(f"{name}: spills {r['spill_bytes']} B, {r.get('registers')} registers")
    assert not bad, "h100: cases that fail or spill:\n" + "\n".join(bad)


def test_ci_subset_covers_every_family():
    """Every kernel kind of the default table meets every dtype in the TPU CI subset (on one
    target or the other), and each extra kind (cal:, mass:) and a model step are in it."""
    register_kinds()
    names = [c for t in TARGETS for c in CI_CASES[t]]
    cases = [Case.parse(c) for c in names if not c.startswith("model:")]
    for kind in DEFAULT_KINDS:
        missing = set(DTYPES) - {c.dtype for c in cases if c.kind == kind}
        assert not missing, f"{kind}: no CI case for {sorted(missing)}"
    assert set(KERNEL_KINDS) == {c.kind for c in cases}
    assert {c.kind for c in map(Case.parse, H100_CASES)} >= set(DEFAULT_KINDS)
    assert {Case.parse(c).dtype for c in H100_CASES} == set(DTYPES)
    defaults = {c.name for c in default_cases()} | set(EXTRA_DEFAULT)
    assert all(c in defaults for c in names if not c.startswith("model:"))
    assert any(c.startswith("model:") for c in names)


def test_model_case_names():
    m = parse_model("llama70b_turbo-turbo3.5-131072-p512-l1-tp8")
    assert (m.config, m.dtype, m.context, m.chunk, m.layers, m.tensor) == (
        "llama70b_turbo", "turbo3.5", 131072, 512, 1, 8)
    assert m.name == "llama70b_turbo-turbo3.5-131072-p512-l1-tp8"
    assert m.group == "llama70b_turbo-*-131072-p512-l1-tp8"
    assert parse_model("smollm2-bf16").context == 32768
    for bad in ("smollm2", "smollm2-bf16-x12", "Smol-bf16"):
        with pytest.raises(ValueError):
            parse_model(bad)
    for name in driver.MODEL_CASES:
        assert parse_model(name).name == name


def test_case_registry():
    c = Case.parse("int4-d128-g8-p16-w32")
    assert (c.kind, c.dtype, c.head_dim, c.gqa, c.page_size, c.window) == (
        "decode", "int4", 128, 8, 16, 32)
    assert c.name == "int4-d128-g8-p16-w32"
    with pytest.raises(ValueError, match="unknown kernel kind"):
        Case.parse("nosuchkind:int4-d128-g8-p16")
    assert all(c.kind in KERNEL_KINDS for c in default_cases())


def test_bytes_table_flags_excess_over_bf16():
    """(xla bytes + kernel reads) / (bf16's x KV byte ratio) per group; > 1.1 is flagged, other
    groups apart."""
    def res(name, acc, kernel, bpt):
        return {"case": f"model:{name}", "ok": True, "bytes_accessed": acc,
                "kernel_read_bytes": kernel, "kv_bytes_per_token": bpt, "cache_bytes": 100,
                "weight_bytes": 10}

    rows = [res("smollm2-bf16-32768-l1", 600.0, 400, 200.0),
            res("smollm2-int8-32768-l1", 340.0, 200, 100.0),   # 540 / (1000 x 0.5) = 1.08: ok
            res("smollm2-int4-32768-l1", 300.0, 100, 50.0),    # 400 / 250 = 1.60: flagged
            res("smollm2-bf16-131072-l1", 2400.0, 1600, 200.0),
            res("smollm2-int4-131072-l1", 600.0, 400, 50.0)]   # 1000 / 1000 = 1.00: ok
    text = driver.model_table(rows)
    assert "| 1.08 |" in text and "**1.60**" in text and "| 1.00 |" in text
    assert text.count("**") == 2 and "smollm2-int4-32768-l1 (1.60)" in text
    # rest/cache: the XLA bytes a format adds over bf16's beyond its copies' (read + write)
    rows[0].update(copy_bytes=20, copy_tiled_bytes=30)
    rows[2].update(copy_bytes=50, copy_tiled_bytes=120)
    line = next(ln for ln in driver.model_table(rows).splitlines() if "int4-32768" in ln)
    # (300 - 600) / 100, then - (170 - 50) / 100; kv floats not reported
    assert line.endswith("| -3.00 | 170 | -4.20 | - |")
    rows[2].update(dequant_count=2, dequant_bytes=3 << 20)
    line = next(ln for ln in driver.model_table(rows).splitlines() if "int4-32768" in ln)
    assert line.endswith("| -4.20 | **2: 3.0M** |")


def test_hlo_copy_bytes():
    """Copies outside fusions at their tiled size: T(r,128) tiles r rows of elements of any
    width ((k,1) packs k of those rows per 32-bit word without further padding)."""
    from kvjax.bench.compile_target import hlo_copy_bytes

    hlo = """%fused_computation.1 (p: u8[4]) -> u8[4] {
  %copy.1 = u8[4]{0} copy(%p)
}

ENTRY %main (a: u16[1,2,1025,16,1], b: u8[2,1025,16,12]) -> u16[1,2,1025,16,1] {
  %copy.91 = u16[1,2,1025,16,1]{3,2,1,4,0:T(8,128)(2,1)S(1)} copy(%slice.25), metadata={}
  %copy.53 = u8[2,1025,16,12]{3,2,1,0:T(8,128)(4,1)} copy(%b)
  %copy-start = (s32[4]{0}, s32[4]{0}, u32[]) copy-start(%x)
  ROOT %copy.2 = f32[3,5]{1,0} copy(%y)
}
"""
    got = hlo_copy_bytes(hlo, frozenset({"u8[2,1025,16,12]", "u8[1,2,1025,16,12]"}))
    # u16: pages 1025 -> 1032 rows (8 per tile), tokens 16 -> 128 lanes; u8: 16 rows (a
    # multiple of 8), 12 -> 128 lanes; the untiled f32 copy as it is; the fused copy and
    # copy-start not counted; the u8 copy is of a pool leaf's type (pool_types)
    assert got == {"copy_count": 3,
                   "copy_bytes": 2 * 2 * 1025 * 16 + 2 * 1025 * 16 * 12 + 60,
                   "copy_tiled_bytes": 2 * 2 * 1032 * 128 + 2 * 1025 * 16 * 128 + 60,
                   "pool_copy_count": 1, "pool_copy_bytes": 2 * 1025 * 16 * 12}


def test_hlo_float_kv_buffers():
    """Float buffers with a head_dim dimension and >= min_elements elements, outside fused
    computations and other than the cache's own leaves, are dequantized K/V copies."""
    from kvjax.bench.compile_target import hlo_float_kv_buffers

    hlo = """%fused_computation.7 (p: u8[8,16,32]) -> bf16[8,16,64] {
  %convert.1 = bf16[8,16,64]{2,1,0} convert(%p)
}

%body (a: (s32[], u16[4,8,16,64])) -> (s32[], u16[4,8,16,64]) {
  %deq = bf16[8,16,64]{2,1,0} fusion(%x), kind=kLoop, calls=%fused_computation.7
  %pair = (f32[2,8,16,64]{3,2,1,0}, u8[8,16,32]{2,1,0}) fusion(%y), kind=kLoop, calls=%f2
  %small = f32[1,16,64]{2,1,0} fusion(%z), kind=kLoop, calls=%f3
  %upd = bf16[4,8,16,64]{3,2,1,0} fusion(%w), kind=kLoop, calls=%f4
  %view = bf16[8,16,64]{2,1,0} bitcast(%deq)
  %gte = f32[2,8,16,64]{3,2,1,0} get-tuple-element(%pair), index=0
  %wide = f32[8,16,128]{2,1,0} fusion(%v), kind=kLoop, calls=%f5
}
"""
    got = hlo_float_kv_buffers(hlo, 64, 8 * 16 * 64, frozenset({("bf16", 4 * 8 * 16 * 64)}))
    # counted: the dequantizing fusion's result and the tuple fusion's f32 member; not: the
    # convert inside the fused computation, the small one, the cache leaf's update (excluded),
    # the bitcast and get-tuple-element views, a buffer without a head_dim dimension
    assert got == {"dequant_count": 2, "dequant_bytes": 8 * 16 * 64 * (2 + 2 * 4),
                   "dequant_largest": "f32[2,8,16,64]"}


def test_tpu_log_parsing(tmp_path):
    """The scoped-VMEM figures as libtpu's code generator logs them (libtpu 0.0.42.1)."""
    from kvjax.bench.compile_target import parse_tpu_log

    (tmp_path / "tpu_driver.vm.root.log.INFO.20261130-141224.1").write_text(
        "I1130 memory_space_assignment_util.cc:618] MSA Vmem breakdown: default scoped vmem "
        "(from flag): 16777216; does_msa_directly_allocate_scoped_vmem: F\n"
        "I1130 code_generator.cc:4155] callee HLO=fusion.3:\n"
        "I1130 code_generator.cc:4155]   vmem.absolute(S)=[999999..$] usage=999999\n"
        "I1130 code_generator.cc:4155] callee HLO=kvjax_paged_decode.1:\n"
        "I1130 code_generator.cc:4155]   vmem.absolute(S)=[57344..$] usage=57344\n"
        "I1130 code_generator.cc:4155] callee HLO=kvjax_paged_decode.2:\n"
        "I1130 code_generator.cc:4155]   vmem.absolute(S)=[8192..$] usage=8192\n"
        "I1130 deepsea_compiler_backend.cc:2160] XLA::TPU program VMEM usage: 1.79M / 128.00M\n")
    got = parse_tpu_log(str(tmp_path))
    assert got == {"vmem_bytes": 57344, "vmem_limit_bytes": 16777216,
                   "program_vmem_bytes": int(1.79 * 2**20), "vmem_capacity_bytes": 128 * 2**20}


def test_missing_extra_is_one_line(monkeypatch):
    """Without libtpu / the CUDA plugin the driver names the extra instead of a traceback."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    for target in ("tpu-v5e", "h100"):
        msg = driver.check_extra(target)
        assert msg and ".[compile]" in msg and "\n" not in msg
    assert driver.main(["--target", "tpu-v6e"]) == 2


def test_tables_from_saved_results(tmp_path, capsys):
    """--from-json prints the saved results' tables without compiling (and without the extra);
    exit 1 when a saved case failed or spilled."""
    import json

    ok = {"case": "int4-d128-g8-p16", "target": "h100", "ok": True, "seconds": 3.0,
          "registers": 168, "spill_bytes": 0, "smem_bytes": 43008, "kernel_calls": 1}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(ok) + "\n")
    assert driver.main(["--target", "h100", "--from-json", str(path)]) == 0
    assert "| int4-d128-g8-p16 | ok | 3.0 | - | 42K | 168 | 0 |" in capsys.readouterr().out
    path.write_text(json.dumps([ok, dict(ok, case="int8-d64-g8-p16", spill_bytes=8)]))
    assert driver.main(["--target", "h100", "--from-json", str(path)]) == 1
    assert "SPILLS 8 B" in capsys.readouterr().out
