"""Compile one kernel case (or one model step) for an accelerator this machine does not have.

    python -m kvjax.bench.compile_case --target tpu-v5e --case int4-d128-g8-p16 [--json]

The worker behind ``python -m kvjax.bench.compile``: a Mosaic CHECK failure aborts the whole
process, so the driver runs each case in its own process. Targets and what each reports:
kvjax/bench/compile_target.py.

Case names: ``[KIND:]DTYPE-dHEAD_DIM-gGQA-pPAGE_SIZE[-wWINDOW]``. KIND picks the kernel step from
``KERNEL_KINDS`` (no prefix: ``decode``, the paged decode kernel; ``ragged:``, the ragged
prefill+decode kernel; ``cal:`` / ``mass:`` from kvjax/bench/compile_kinds.py); ``model:NAME``
compiles a whole model step (kvjax/bench/compile_model.py). Every argument is an abstract
``jax.ShapeDtypeStruct`` placed on the target's device, so nothing is allocated and the kernels
pick their lowering from the platform of the step (backend "auto").

To add a kernel family: write ``build(case, dev) -> (step_fn, abstract_args)`` and register it in
``KERNEL_KINDS``; add its name to ``DEFAULT_KINDS`` to put its rotation in the default table
(``--cases default``), and a case or two to tests/test_compile.py's CI subset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from kvjax.bench.compile_target import (  # noqa: F401 - re-exported for the driver and tests
    EXTRA_HINT,
    GPU_SPECS,
    TARGETS,
    TPU_TOPOLOGIES,
    compile_fn,
    ptxas_report,
    target_device,
)

DTYPES = ("bf16", "fp8", "int8", "int4", "k8v4", "k8v4turbo", "kivi2", "kivi4", "turbo2.5",
          "turbo3", "turbo3.5", "turbo4")


@dataclass(frozen=True)
class Case:
    dtype: str
    head_dim: int
    gqa: int
    page_size: int
    window: int = -1  # bf16 ring tokens; -1: the config default (128 for compressed dtypes)
    kind: str = "decode"  # a key of KERNEL_KINDS

    @property
    def name(self) -> str:
        w = "" if self.window < 0 else f"-w{self.window}"
        k = "" if self.kind == "decode" else f"{self.kind}:"
        return f"{k}{self.dtype}-d{self.head_dim}-g{self.gqa}-p{self.page_size}{w}"

    @classmethod
    def parse(cls, name: str) -> Case:
        m = re.fullmatch(r"(?:([a-z_]+):)?(.+)-d(\d+)-g(\d+)-p(\d+)(?:-w(\d+))?", name)
        if not m:
            raise ValueError(f"bad case {name!r}; expected [KIND:]DTYPE-dD-gG-pP[-wW], e.g. "
                             "int4-d128-g8-p16")
        kind = m[1] or "decode"
        if kind not in KERNEL_KINDS:
            register_kinds()
        if kind not in KERNEL_KINDS:
            raise ValueError(f"bad case {name!r}: unknown kernel kind {kind!r}; known: "
                             f"{', '.join(KERNEL_KINDS)}")
        return cls(m[2], int(m[3]), int(m[4]), int(m[5]), -1 if m[6] is None else int(m[6]),
                   kind)


def _rotation(kind: str) -> list[Case]:
    """Every dtype at head_dim 64 and 128; GQA 1/3/8 and page sizes 16/32 (KIVI: 32/64, its
    group is 32 tokens) rotate through them so each value meets every format family."""
    out = []
    for i, dt in enumerate(DTYPES):
        for j, d in enumerate((64, 128)):
            g = (1, 3, 8)[(i + 2 * j) % 3]
            ps = (32, 64)[(i + j) % 2] if dt.startswith("kivi") else (16, 32)[(i + j) % 2]
            out.append(Case(dt, d, g, ps, kind=kind))
    return out


def default_cases() -> list[Case]:
    """The default table: the rotation of every kind in DEFAULT_KINDS."""
    return [c for kind in DEFAULT_KINDS for c in _rotation(kind)]


def all_cases() -> list[Case]:
    return [Case(dt, d, g, ps, kind=kind) for kind in DEFAULT_KINDS for dt in DTYPES
            for d in (64, 128) for g in (1, 3, 8)
            for ps in ((32, 64) if dt.startswith("kivi") else (16, 32))]


def case_args(case: Case, dev, *, batch: int = 4, context: int = 4096):
    """Abstract (q, seg, page_table, lengths, window_slots) of a decode step on dev."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from kvjax.cache.paged import init_cache
    from kvjax.config import CacheConfig, ModelConfig

    hkv = 2
    mc = ModelConfig(num_layers=2, num_heads=case.gqa * hkv, num_kv_heads=hkv,
                     head_dim=case.head_dim, hidden_size=64, intermediate_size=64, vocab_size=32)
    cc = CacheConfig(dtype=case.dtype, page_size=case.page_size, window=case.window)
    max_pages = context // case.page_size
    cache = jax.eval_shape(lambda: init_cache(mc, cc, batch * max_pages + 1, num_slots=batch))
    seg = cache.segments[0]
    sh = SingleDeviceSharding(dev)

    def place(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    q = jax.ShapeDtypeStruct((batch, 1, case.gqa * hkv, case.head_dim), jnp.bfloat16,
                             sharding=sh)
    i32 = jnp.int32
    return (q, jax.tree.map(place, seg), place(jax.ShapeDtypeStruct((batch, max_pages), i32)),
            place(jax.ShapeDtypeStruct((batch,), i32)), place(jax.ShapeDtypeStruct((batch,), i32)))


def decode_step(case: Case, dev) -> tuple[Callable, tuple]:
    """The paged decode kernel: batch 4, 4K tokens of pages, layer 1 of 2."""
    import jax.numpy as jnp

    from kvjax import pallas_kernels

    def step(q, seg, pt, lens, slots):
        return pallas_kernels.paged_attention(q, seg, jnp.int32(1), pt, lens,
                                              slots if seg.window else None)

    return step, case_args(case, dev)


def ragged_step(case: Case, dev, decode_args: tuple | None = None
                ) -> tuple[Callable, tuple]:
    """The ragged prefill+decode kernel (kvjax/pallas_kernels/ragged_attention.py): a 4-row
    step of 64 tokens (prefill chunks and decode rows, chunk K/V passed in) over 4K of pages.
    decode_args: case_args' tuple to build on (default: case_args(case, dev))."""
    import jax
    import jax.numpy as jnp

    from kvjax.pallas_kernels import ragged_attention

    q1, seg, pt, lens, slots = decode_args or case_args(case, dev)
    b, _, nh, d = q1.shape
    t, sh = 64, q1.sharding
    q = jax.ShapeDtypeStruct((b, t, nh, d), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((b, t, seg.k[0].shape[1], d), jnp.bfloat16, sharding=sh)
    pos = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sh)

    def step(q, k, v, seg, pt, lens, pos, slots):
        return ragged_attention.ragged_paged_attention(q, k, v, seg, jnp.int32(1), pt, lens, pos,
                                                       slots if seg.window else None)

    return step, (q, kv, kv, seg, pt, lens, pos, slots)


# kind -> build(case, dev) -> (step_fn, abstract args). The one table to extend.
KERNEL_KINDS: dict[str, Callable[[Case, object], tuple[Callable, tuple]]] = {
    "decode": decode_step,
    "ragged": ragged_step,
}
# Kinds whose rotation (every dtype at head_dim 64 and 128) is in the default table
# (`--cases default`) and whose product is `--cases all`.
DEFAULT_KINDS: list[str] = ["decode", "ragged"]
# Also in the driver's default table: cases of kvjax/bench/compile_kinds.py's kinds (calibrated
# TurboQuant pools under the decode and the ragged kernel, the H2O mass output).
EXTRA_DEFAULT: list[str] = ["cal:turbo3.5-d64-g3-p16", "cal:turbo2.5-d128-g3-p32",
                            "calragged:turbo3.5-d64-g3-p16", "calragged:turbo2.5-d128-g3-p32",
                            "mass:int4-d128-g8-p16", "mass:kivi4-d64-g3-p64"]


def register_kinds() -> None:
    """Add compile_kinds' kinds (cal:, mass:) to KERNEL_KINDS. Lazy: compile_kinds imports this
    module, so it cannot be imported while this one loads."""
    if "cal" not in KERNEL_KINDS:
        from kvjax.bench import compile_kinds

        KERNEL_KINDS.update(compile_kinds.KINDS)


def run_case(case: Case, target: str) -> dict:
    fn, args = KERNEL_KINDS[case.kind](case, target_device(target))
    return compile_fn(fn, args, target)


def _error(e: Exception) -> dict:
    msg = str(e).strip().splitlines()
    return {"ok": False, "error": f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, choices=TARGETS)
    ap.add_argument("--case", required=True,
                    help="[KIND:]DTYPE-dD-gG-pP, or model:NAME (see compile_model)")
    ap.add_argument("--json", action="store_true", help="print one JSON line (for the driver)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    dump = None
    if args.target in GPU_SPECS and "--xla_dump_to" not in os.environ.get("XLA_FLAGS", ""):
        dump = tempfile.mkdtemp(prefix="kvjax_compile_")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_dump_to={dump}").strip()
    try:
        if args.case.startswith("model:"):
            from kvjax.bench.compile_model import run_model
            res = run_model(args.case[len("model:"):], args.target)
        else:
            try:
                case = Case.parse(args.case)
            except ValueError as e:
                raise SystemExit(str(e)) from None
            res = run_case(case, args.target)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - report the compiler's first line, like the CLI
        res = _error(e)
    if dump is not None:
        res.update(ptxas_report(dump))
        import shutil
        shutil.rmtree(dump, ignore_errors=True)
    res.update(case=args.case, target=args.target)
    print(json.dumps(res) if args.json else res, flush=True)
    sys.exit(0 if res.get("ok") else 1)


if __name__ == "__main__":
    main()
