"""Pallas API differences between jax 0.10.2 (this CPU machine) and 0.11.x (the GPU image).

Everything version-sensitive the kernels use goes through here, so a rename is one edit:

* Triton: ``jax.experimental.pallas.triton.CompilerParams`` (``TritonCompilerParams`` before 0.7).
  Passing an instance is what selects the Triton lowering on GPU (Mosaic GPU is the default since
  jax 0.9). jax 0.11 deprecates the Triton backend with a DeprecationWarning; we silence exactly
  that warning and keep working.
* TPU: ``pltpu.CompilerParams`` (``TPUCompilerParams`` before 0.7),
  ``pltpu.PrefetchScalarGridSpec``.
* Mosaic GPU: ``jax.experimental.pallas.mosaic_gpu`` (Hopper+); only probed, see ``has_mosaic_gpu``.
"""

from __future__ import annotations

import warnings

import jax
from jax.experimental import pallas as pl

warnings.filterwarnings("ignore", category=DeprecationWarning,
                        message=".*Pallas Triton.*deprecated.*")
warnings.filterwarnings("ignore", category=DeprecationWarning,
                        message=".*Triton backend is deprecated.*")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as pltriton

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

ANY = pl.ANY
PrefetchScalarGridSpec = pltpu.PrefetchScalarGridSpec


def triton_params(num_warps: int = 4, num_stages: int = 2):
    cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_params(dimension_semantics: tuple[str, ...]):
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=dimension_semantics)


def has_mosaic_gpu() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas import mosaic_gpu  # noqa: F401
        return True
    except ImportError:
        return False
