"""benchmarks/toy2d.py's sliced W2 (metrics.distances along NumPy-drawn directions) against the direct NumPy
computation it replaced, so that the figures' numbers in docs/toy2d.md stay comparable."""

import numpy as np
import pytest

from benchmarks import toy2d


def test_toy2d_sliced_w2_matches_the_numpy_computation():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(500, 2)).astype(np.float32)
    b = (rng.normal(size=(500, 2)) * 2 + 1).astype(np.float32)
    theta = np.random.default_rng(7).normal(size=(2, 64))
    theta /= np.linalg.norm(theta, axis=0)
    pa, pb = np.sort(a @ theta, axis=0), np.sort(b @ theta, axis=0)
    assert toy2d.sliced_w2(a, b, num_proj=64, seed=7) == pytest.approx(np.sqrt(((pa - pb) ** 2).mean()), rel=1e-12)
