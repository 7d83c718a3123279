"""Codebooks and rotations against the exact values in shared/reference/turboquant.md."""

import math

import numpy as np
import pytest

from kvjax.quant.codebooks import gaussian_codebook, polar_angle_codebook, sphere_codebook
from kvjax.quant.rotation import haar_rotation, hadamard_rotation, projection


@pytest.mark.parametrize(
    "d,targets",
    [
        (128, [0.360889, 0.116000, 0.033966, 0.009315]),
        (64, [0.358387, 0.114526, 0.033391, 0.009132]),
        (256, [0.362136, 0.116740, 0.034256, 0.009408]),
    ],
)
def test_sphere_codebook_distortion(d, targets):
    # Exact Beta-marginal Lloyd-Max (reference 1.5, computed with incomplete beta functions).
    for b, t in enumerate(targets, start=1):
        assert abs(d * sphere_codebook(d, b).distortion - t) < 1e-5, (d, b)


def test_sphere_codebook_centroids():
    # b = 1: the centroid is E|X| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)).
    e_abs = math.exp(math.lgamma(64) - math.lgamma(64.5)) / math.sqrt(math.pi)
    assert abs(sphere_codebook(128, 1).centroids[1] - e_abs) < 1e-7
    ref = {
        2: [0.039992, 0.133042],
        3: [0.021604, 0.066586, 0.118140, 0.188397],
        4: [0.011302, 0.034152, 0.057772, 0.082828, 0.110288, 0.141805, 0.180836, 0.237664],
    }
    for b, pos in ref.items():
        c = sphere_codebook(128, b).centroids
        np.testing.assert_allclose(c[len(c) // 2 :], pos, atol=2e-6)
        np.testing.assert_array_equal(c, -c[::-1])  # symmetric


def test_gaussian_codebook_matches_max_1960():
    ref = {
        1: ([0.797885], 0.363380),
        2: ([0.452780, 1.510418], 0.117482),
        3: ([0.245094, 0.756005, 1.343909, 2.151946], 0.034548),
    }
    for b, (pos, dist) in ref.items():
        cb = gaussian_codebook(b)
        np.testing.assert_allclose(cb.centroids[len(cb.centroids) // 2 :], pos, atol=2e-6)
        assert abs(cb.distortion - dist) < 1e-6


def test_polar_angle_codebooks():
    # Reference 5.3 (analytic Lloyd-Max for sin^(2^(l-1)-1)(2 psi)).
    np.testing.assert_allclose(
        polar_angle_codebook(2, 2).centroids, [0.309756, 0.633980, 0.936815, 1.261040], atol=2e-6
    )
    np.testing.assert_allclose(
        polar_angle_codebook(3, 2).centroids, [0.426250, 0.674385, 0.896411, 1.144546], atol=2e-6
    )
    np.testing.assert_allclose(
        polar_angle_codebook(4, 2).centroids, [0.524214, 0.705909, 0.864887, 1.046582], atol=2e-6
    )
    assert abs(polar_angle_codebook(1, 4).distortion - 0.012851) < 1e-6


def test_rotations_are_orthogonal_and_deterministic():
    mats = (haar_rotation(3, 128), hadamard_rotation(3, 128), projection("orthogonal", 3, 128, 128))
    for r in mats:
        np.testing.assert_allclose(r.T.astype(np.float64) @ r, np.eye(128), atol=1e-5)
    np.testing.assert_array_equal(haar_rotation(5, 64), haar_rotation.__wrapped__(5, 64))
    assert not np.allclose(haar_rotation(5, 64), haar_rotation(6, 64))
    s = projection("orthogonal", 0, 256, 128)  # m > d: stacked independent blocks, unit rows
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, atol=1e-5)
