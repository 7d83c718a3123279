"""Seeded random rotations and projections, built once in numpy and cached.

Every matrix here is a constant of a quantizer's configuration: it is a deterministic function of
(seed, dimension, kind), so two processes (or hosts) that build the same quantizer get bit-identical
matrices and can read each other's codes.

* ``haar_rotation``: a Haar-random orthogonal matrix, the Q factor of the QR decomposition of an
  i.i.d. N(0, 1) matrix with the sign of column j multiplied by sign(R_jj) (without that fix QR's
  sign convention makes Q slightly non-Haar). This is what TurboQuant's analysis assumes: every
  input, including one-hot and outlier-heavy ones, gets exactly the sphere-marginal coordinates.
* ``hadamard_rotation``: ``rounds`` randomized Hadamard transforms H D_r ... H D_1 / sqrt(d)^rounds
  (D = random +-1 diagonal, H = Sylvester Hadamard), returned as a dense matrix. Cheaper to apply
  with a fast Walsh-Hadamard transform (d log d instead of d^2), but one round is not Haar: H D e_1
  has every entry +-1/sqrt(d), so structured inputs land far from the sphere marginal. Measured at
  d=128 on one-hot inputs (turboquant.md section 3.2): TurboQuant_mse b=2 gives D_mse 0.255 with
  one round versus 0.116 with Haar (2.2x worse); two rounds give 0.119. Our default is Haar;
  "hadamard" means two rounds. On an accelerator the 128x128 matmul is cheap, so Haar costs little.
* ``projection``: QJL's m x d sketch S, either i.i.d. N(0,1) rows (the TurboQuant paper's Algorithm
  2) or orthogonalised rows (QR per block of d rows; the QJL paper's choice, which lowers the score
  variance by about 2.75x at the same bit cost; turboquant.md section 3.2 note 3).
"""

from __future__ import annotations

import functools
import math

import numpy as np

_SALT_ROTATION = 0x5EED_0001
_SALT_HADAMARD = 0x5EED_0002
_SALT_PROJECTION = 0x5EED_0003


def _rng(seed: int, salt: int, d: int) -> np.random.Generator:
    # Different purposes (rotation vs projection) get independent streams from one user seed.
    return np.random.default_rng([seed, salt, d])


def _haar(rng: np.random.Generator, d: int) -> np.ndarray:
    g = rng.standard_normal((d, d))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


@functools.cache
def haar_rotation(seed: int, d: int) -> np.ndarray:
    """Haar-random orthogonal matrix, float32.  # [d, d]; rotate a row vector with ``x @ R.T``"""
    return _frozen(_haar(_rng(seed, _SALT_ROTATION, d), d).astype(np.float32))


def sylvester_hadamard(d: int) -> np.ndarray:
    """Unnormalised Sylvester Hadamard matrix with +-1 entries.  # [d, d]; d a power of two"""
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two dimension, got {d}")
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


@functools.cache
def hadamard_rotation(seed: int, d: int, rounds: int = 2) -> np.ndarray:
    """Product of ``rounds`` randomized Hadamard transforms as a dense orthogonal float32 matrix."""
    h = sylvester_hadamard(d) / math.sqrt(d)
    rng = _rng(seed, _SALT_HADAMARD, d)
    m = np.eye(d)
    for _ in range(rounds):
        signs = rng.choice([-1.0, 1.0], size=d)
        m = h @ (signs[:, None] * m)
    return _frozen(m.astype(np.float32))


@functools.cache
def rotation(kind: str, seed: int, d: int) -> np.ndarray:
    """Rotation by name: "haar" (default everywhere), "hadamard" (2 rounds) or "hadamard1"."""
    if kind == "haar":
        return haar_rotation(seed, d)
    if kind == "hadamard":
        return hadamard_rotation(seed, d, 2)
    if kind == "hadamard1":
        return hadamard_rotation(seed, d, 1)
    raise ValueError(f"unknown rotation {kind!r}; valid: haar, hadamard, hadamard1")


@functools.cache
def projection(kind: str, seed: int, m: int, d: int) -> np.ndarray:
    """QJL sketch matrix S, float32.  # [m, d]

    kind "gaussian": i.i.d. N(0, 1) entries. kind "orthogonal": unit-norm rows, orthonormal within
    each block of d rows (m may exceed d: blocks are independent Haar draws).
    """
    rng = _rng(seed, _SALT_PROJECTION, d * 1_000_003 + m)
    if kind == "gaussian":
        s = rng.standard_normal((m, d))
    elif kind == "orthogonal":
        blocks = [_haar(rng, d) for _ in range(-(-m // d))]
        s = np.concatenate(blocks, axis=0)[:m]
    else:
        raise ValueError(f"unknown projection {kind!r}; valid: gaussian, orthogonal")
    return _frozen(s.astype(np.float32))


def sign_estimator_scale(kind: str, d: int) -> float:
    """1 / E|<s, u>| for a row s of the sketch and a unit vector u, so the QJL estimate is unbiased.

    For a N(0, I) row, <s, u> ~ N(0, 1) and E|.| = sqrt(2/pi): the paper's sqrt(pi/2) factor. For a
    unit row uniform on the sphere, E|s_1| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)); using
    sqrt(pi/2)/sqrt(d) there instead would leave a 1.002x bias at d=128 (turboquant.md 3.2 note 3).
    The QJL estimate of <y, r> is  scale / m * |r| * <S y, sign(S r)>.
    """
    if kind == "gaussian":
        return math.sqrt(math.pi / 2)
    if kind == "orthogonal":
        e_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
        return 1.0 / e_abs
    raise ValueError(f"unknown projection {kind!r}; valid: gaussian, orthogonal")


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a
