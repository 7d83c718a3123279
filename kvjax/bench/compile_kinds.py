"""Kernel kinds for ``python -m kvjax.bench.compile`` beyond the plain decode kernel:

    cal:CASE    the decode kernel over calibrated TurboQuant pools (kvjax/calibrate.py: keys
                centred per token, channels reordered per layer and KV head; a format-1 file)
    calragged:CASE  the ragged prefill+decode kernel over calibrated TurboQuant pools with a
                format-2 file (keys centred on R(p) k_mean_rope: smollm2's shipped calibration)
    mass:CASE   the decode kernel with the H2O attention-mass side output (with_mass=True)

``KINDS`` has the same shape as compile_case.KERNEL_KINDS (``build(case, dev) -> (step, args)``);
compile_case.register_kinds() adds them when a case names one, so the driver and its worker take
them like any other kind (``--cases cal:turbo3.5-d64-g3-p16``). One case also compiles with

    python -m kvjax.bench.compile_kinds --target tpu-v5e --case cal:turbo3.5-d64-g3-p16 [--json]

(the same worker, report and exit code as kvjax.bench.compile_case).
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from collections.abc import Callable

from kvjax.bench import compile_case
from kvjax.bench.compile_case import Case

_CAL_DIRS: dict[tuple[int, int, int, bool], str] = {}


def calibration_dir(layers: int, kv_heads: int, head_dim: int, rope: bool = False) -> str:
    """A KV calibration with random channel orders and a key mean, in a temporary directory
    (compiling needs its shapes only; the values change no code). rope: format 2, the mean
    also as a pre-RoPE mean with the inverse frequencies of _args' model config (keys centred
    on R(p) mu, as the shipped smollm2 file)."""
    import numpy as np

    from kvjax.calibrate import KVCalibration

    key = (layers, kv_heads, head_dim, rope)
    if key not in _CAL_DIRS:
        rng = np.random.default_rng(0)
        shape = key[:3]
        order = np.argsort(rng.random((2, *shape)), axis=-1)
        mu = rng.standard_normal(shape).astype(np.float32)
        extra = {}
        if rope:
            from models.layers import rope_inv_freq

            extra = {"k_mean_rope": mu, "rope_inv_freq": rope_inv_freq(_model(head_dim, 1))}
        cal = KVCalibration(k_mean=mu, k_order=order[0], v_order=order[1],
                            source="compile_kinds", **extra)
        path = tempfile.mkdtemp(prefix="kvjax_cal_")
        atexit.register(shutil.rmtree, path, True)  # one per case process: leave no /tmp trail
        _CAL_DIRS[key] = str(cal.save(path))
    return _CAL_DIRS[key]


def _model(head_dim: int, gqa: int, hkv: int = 2):
    from kvjax.config import ModelConfig

    return ModelConfig(num_layers=2, num_heads=gqa * hkv, num_kv_heads=hkv, head_dim=head_dim,
                       hidden_size=64, intermediate_size=64, vocab_size=32)


def _args(case: Case, dev, calibration: str = "", batch: int = 4, context: int = 4096):
    """compile_case.case_args with an optional KV calibration."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from kvjax.cache.paged import init_cache
    from kvjax.config import CacheConfig

    hkv = 2
    mc = _model(case.head_dim, case.gqa, hkv)
    cc = CacheConfig(dtype=case.dtype, page_size=case.page_size, window=case.window,
                     calibration=calibration)
    max_pages = context // case.page_size
    cache = jax.eval_shape(lambda: init_cache(mc, cc, batch * max_pages + 1, num_slots=batch))
    sh = SingleDeviceSharding(dev)

    def place(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    i32 = jnp.int32
    q = jax.ShapeDtypeStruct((batch, 1, case.gqa * hkv, case.head_dim), jnp.bfloat16,
                             sharding=sh)
    return (q, jax.tree.map(place, cache.segments[0]),
            place(jax.ShapeDtypeStruct((batch, max_pages), i32)),
            place(jax.ShapeDtypeStruct((batch,), i32)), place(jax.ShapeDtypeStruct((batch,), i32)))


def _step(with_mass: bool) -> Callable:
    import jax.numpy as jnp

    from kvjax import pallas_kernels

    def step(q, seg, pt, lens, slots):
        return pallas_kernels.paged_attention(q, seg, jnp.int32(1), pt, lens,
                                              slots if seg.window else None,
                                              with_mass=with_mass)
    return step


def calibrated_step(case: Case, dev) -> tuple[Callable, tuple]:
    """Decode over calibrated TurboQuant pools (turbo dtypes; others are not calibrated)."""
    if not case.dtype.startswith("turbo"):
        raise ValueError(f"cal: needs a turbo dtype (calibration is TurboQuant's), got "
                         f"{case.dtype!r}")
    return _step(False), _args(case, dev, calibration_dir(2, 2, case.head_dim))


def calibrated_ragged_step(case: Case, dev) -> tuple[Callable, tuple]:
    """compile_case.ragged_step over calibrated TurboQuant pools, RoPE-centred (format 2)."""
    if not case.dtype.startswith("turbo"):
        raise ValueError(f"calragged: needs a turbo dtype, got {case.dtype!r}")
    return compile_case.ragged_step(
        case, dev, _args(case, dev, calibration_dir(2, 2, case.head_dim, rope=True)))


def mass_step(case: Case, dev) -> tuple[Callable, tuple]:
    """Decode with the H2O attention-mass side output."""
    return _step(True), _args(case, dev)


KINDS: dict[str, Callable[[Case, object], tuple[Callable, tuple]]] = {
    "cal": calibrated_step, "calragged": calibrated_ragged_step, "mass": mass_step}


def main(argv: list[str] | None = None) -> None:
    compile_case.KERNEL_KINDS.update(KINDS)
    compile_case.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
