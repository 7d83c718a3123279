"""KV-cache quantizers as pure-JAX references: one interface, one registry.

    qz = make_quantizer("turbo3", head_dim=128, seed=0, role="key")
    codes = qz.quantize(k)          # k: [..., 128] -> pytree of packed arrays + metadata
    k_hat = qz.dequantize(codes)    # [..., 128]
    s = qz.scores(q, codes)         # <q, k> estimated from the codes, broadcasting batch shapes
    qz.bytes_per_token()            # stored bytes per token (per head), metadata included

See base.py for the contract. Methods (one file each): plain.py (bf16), fp8.py, intx.py, kivi.py,
turboquant.py, qjl.py, polarquant.py; shared pieces in packing.py, codebooks.py, rotation.py.

Names (``VALID_NAMES``):
  bf16                      uncompressed baseline
  fp8_e4m3, fp8_e5m2        FP8, per-token-head dynamic scales (``static=True`` or the ``_static``
                            names: one per-tensor scale, set it with ``qz.calibrate(first_batch)``)
  int8, int4                symmetric, per-token-head scales
  kivi2, kivi4              KIVI; ``role="key"`` quantizes groups ``[..., G, d]`` per channel,
                            ``role="value"`` per token; ``group_size`` (G, default 32). KiviStream
                            adds the residual window.
  turbo_mseB                TurboQuant_mse, B in 1, 2, 2.5, 3, 3.5, 4
  turbo_prodB               TurboQuant_prod, B in 1, 2, 2.5, 3, 3.5, 4 ((B-1)-bit mse + 1-bit QJL)
  turboB                    B in 2, 2.5, 3, 3.5, 4: TurboQuant_mse with norm correction for keys
                            and values. QJL is off for keys: measured on SmolLM2 (decode-step KL
                            vs bf16, turbo4) prod keys 0.0266 against 0.0144 for mse keys at fewer
                            bytes, as vLLM and others found (BENCHMARKS.md lever table); norm
                            correction 0.0144 -> 0.0124; keys store the unbiased norm
                            (norm_correct="unbiased": q.k not shrunk), values the length
                            correction. ``turbo_prodB`` keeps the QJL form.
  qjl                       1-bit QJL sketch of keys (``sketch_dim``, default head_dim)
  polar                     PolarQuant, 4 levels, (4, 2, 2, 2) bits: 3.875 bits/coord

Fractional TurboQuant widths B split the channels: n_outliers = (B - floor B) * head_dim channels
at ceil(B) bits, the rest at floor(B), each set its own TurboQuant instance; call
``qz.calibrate(sample)`` to choose the outliers as the highest-energy channels (turboquant.py).
Options: ``rotation`` ("haar" | "hadamard" | "hadamard1"), ``projection`` ("orthogonal" |
"gaussian", the QJL sketch), ``n_outliers``, ``norm_correct`` (mse stages: False, True or
"unbiased"; default "unbiased" for turboB keys, True for turboB values, off for turbo_mseB),
``meta_dtype``.

Rotations and codebooks are deterministic in (seed, head_dim, bits): use different seeds for K and V
(and per layer if desired); every host building the same quantizer gets identical constants.
"""

from __future__ import annotations

from typing import Any

from kvjax.quant.base import Quantizer, stored_nbytes
from kvjax.quant.fp8 import FP8Quantizer
from kvjax.quant.intx import IntQuantizer
from kvjax.quant.kivi import KiviKeyQuantizer, KiviStream, KiviValueQuantizer, build_kivi
from kvjax.quant.plain import PlainQuantizer
from kvjax.quant.polarquant import PolarQuantizer
from kvjax.quant.qjl import QjlQuantizer
from kvjax.quant.turboquant import ChannelSplit, TurboMse, TurboProd, build_turbo

_TURBO_WIDTHS = ("1", "2", "2.5", "3", "3.5", "4")
VALID_NAMES: tuple[str, ...] = (
    "bf16",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_e4m3_static",
    "fp8_e5m2_static",
    "int8",
    "int4",
    "kivi2",
    "kivi4",
    *(f"turbo_mse{b}" for b in _TURBO_WIDTHS),
    *(f"turbo_prod{b}" for b in _TURBO_WIDTHS),
    *(f"turbo{b}" for b in _TURBO_WIDTHS[1:]),
    "qjl",
    "polar",
)
_BITS_BASES = ("int", "kivi", "turbo_mse", "turbo_prod", "turbo")

__all__ = [
    "VALID_NAMES",
    "ChannelSplit",
    "FP8Quantizer",
    "IntQuantizer",
    "KiviKeyQuantizer",
    "KiviStream",
    "KiviValueQuantizer",
    "PlainQuantizer",
    "PolarQuantizer",
    "QjlQuantizer",
    "Quantizer",
    "TurboMse",
    "TurboProd",
    "make_quantizer",
    "stored_nbytes",
]


def _check_kw(name: str, kw: dict[str, Any], allowed: tuple[str, ...]) -> None:
    bad = sorted(set(kw) - set(allowed))
    if bad:
        raise TypeError(f"{name}: unexpected options {bad}; accepted: {sorted(allowed)}")


def _with_meta(qz: Quantizer, meta_dtype: Any) -> Quantizer:
    if isinstance(qz, ChannelSplit):
        return qz.replace(hi=_with_meta(qz.hi, meta_dtype), lo=_with_meta(qz.lo, meta_dtype))
    return qz.replace(meta_dtype=meta_dtype)


def make_quantizer(
    name: str, head_dim: int, seed: int = 0, *, role: str = "key", **kw: Any
) -> Quantizer:
    """Build a quantizer by name (see the module docstring for names and options).

    role: "key" or "value": picks KIVI's key/value quantizer and TurboQuant prod/mse for "turboB".
    bits: optional, combined with a base name ("int", "kivi", "turbo", "turbo_mse", "turbo_prod").
    """
    if "bits" in kw:
        bits = kw.pop("bits")
        if name not in _BITS_BASES:
            raise ValueError(f"bits= only goes with a base name {_BITS_BASES}, got {name!r}")
        name = f"{name}{bits:g}"
    if name not in VALID_NAMES:
        raise ValueError(f"unknown quantizer {name!r}; valid names: {', '.join(VALID_NAMES)}")
    if role not in ("key", "value"):
        raise ValueError(f"role must be 'key' or 'value', got {role!r}")
    meta_dtype = kw.pop("meta_dtype", None)
    qz: Quantizer
    if name == "bf16":
        _check_kw(name, kw, ())
        return PlainQuantizer(head_dim=head_dim)
    if name.startswith("fp8_"):
        _check_kw(name, kw, ("static",))
        fmt = name.split("_")[1]
        static = name.endswith("_static") or bool(kw.get("static", False))
        qz = FP8Quantizer(head_dim=head_dim, fmt=fmt, static=static)
    elif name.startswith("int"):
        _check_kw(name, kw, ())
        qz = IntQuantizer(head_dim=head_dim, bits=int(name[3:]))
    elif name.startswith("kivi"):
        _check_kw(name, kw, ("group_size",))
        qz = build_kivi(head_dim, int(name[4:]), role, kw.get("group_size", 32))
    elif name.startswith("turbo"):
        _check_kw(name, kw, ("rotation", "projection", "n_outliers", "norm_correct"))
        nc = kw.get("norm_correct", False)
        if name.startswith("turbo_mse"):
            variant, bits = "mse", float(name[len("turbo_mse") :])
        elif name.startswith("turbo_prod"):
            variant, bits = "prod", float(name[len("turbo_prod") :])
        else:
            variant, bits = "mse", float(name[len("turbo") :])
            # Keys: the unbiased norm (no shrinkage of q.k); values: the length correction
            # (BENCHMARKS.md "Stored norm" screen: keys -3 to -9% KL, values no gain).
            nc = kw.get("norm_correct", "unbiased" if role == "key" else True)
        qz = build_turbo(
            head_dim,
            bits,
            variant,
            seed,
            rotation_kind=kw.get("rotation", "haar"),
            projection_kind=kw.get("projection", "orthogonal"),
            n_outliers=kw.get("n_outliers"),
            norm_correct=nc,
        )
    elif name == "qjl":
        _check_kw(name, kw, ("sketch_dim", "projection"))
        qz = QjlQuantizer.build(
            head_dim, seed, kw.get("sketch_dim"), kw.get("projection", "orthogonal")
        )
    else:  # polar
        _check_kw(name, kw, ("level_bits", "rotation"))
        qz = PolarQuantizer.build(
            head_dim, seed, tuple(kw.get("level_bits", (4, 2, 2, 2))), kw.get("rotation", "haar")
        )
    return qz if meta_dtype is None else _with_meta(qz, meta_dtype)
