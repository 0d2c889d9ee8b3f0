"""The metrics of benchmarks/dpmot_digits.py and benchmarks/dpmot_quality.py on tiny inputs, against independent
NumPy / SciPy computations (the distances' own tests: tests/metrics/test_distances.py). The benchmarks themselves
(minutes) are not run here."""

import numpy as np
import pytest
import scipy.stats
import torch

import demo
from benchmarks import dpmot_digits, dpmot_quality
from tests.metrics.test_distances import np_median_nn, np_median_pairwise, np_mmd2, np_sliced_w2


def _np_quantize(x):
    return np.clip(np.floor(x * 127.5 + 128), 0, 255) / 127.5 - 1


def _directions(dim, num=256, seed=0):
    # The benchmarks' sliced W2 directions: metrics.distances' default, 256 seeded N(0, I) draws, normalised.
    v = torch.randn(dim, num, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    return v / np.linalg.norm(v, axis=0, keepdims=True)


def _classifier(resolution=8, seed=0):
    torch.manual_seed(seed)
    return demo.make_classifier(resolution).eval().requires_grad_(False)


def test_judge_outputs_and_stats_match_a_direct_computation():
    net = _classifier()
    x = torch.rand(30, 3, 8, 8) * 2 - 1
    probs, feats = dpmot_digits.judge_outputs(net, x, batch=7)
    with torch.no_grad():
        logits = net(x).double().numpy()
    expect = np.exp(logits - logits.max(1, keepdims=True))
    expect /= expect.sum(1, keepdims=True)
    np.testing.assert_allclose(probs.numpy(), expect, rtol=1e-5, atol=1e-7)
    assert feats.shape == (30, 128)
    # judge_stats on probabilities with a known answer: 4 samples, 3 classes.
    p = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    unreadable, tv = dpmot_digits.judge_stats(p, threshold=0.5)
    assert unreadable == pytest.approx(0.25)
    # Predicted classes 0, 0, 1, 2: histogram (1/2, 1/4, 1/4) against (1/3, 1/3, 1/3).
    assert tv == pytest.approx(0.5 * (1 / 6 + 1 / 12 + 1 / 12))


def test_distinct_share_counts_different_8bit_images():
    x = torch.rand(6, 3, 4, 4) * 2 - 1
    x[1] = x[0]
    x[4] = dpmot_digits.quantize(x[3])      # the same 8-bit image as x[3]
    assert dpmot_digits.distinct_share(x) == pytest.approx(4 / 6)


def test_evaluate_matches_independent_metrics():
    rng = np.random.default_rng(0)
    m, n_train = 12, 7
    fresh = torch.as_tensor(_np_quantize(rng.uniform(-1, 1, (m, 3, 8, 8)))).float()
    fresh2 = torch.as_tensor(_np_quantize(rng.uniform(-1, 1, (m, 3, 8, 8)))).float()
    train = torch.as_tensor(_np_quantize(rng.uniform(-1, 1, (n_train, 3, 8, 8)))).float()
    x = torch.as_tensor(rng.normal(0, 0.7, (m, 3, 8, 8))).float()       # partly outside [-1, 1]: clipped
    net = _classifier()
    xq = _np_quantize(x.double().numpy()).reshape(m, -1)
    with torch.no_grad():   # The judge's view, from a full forward pass of the classifier on the quantised samples.
        xq_t = torch.as_tensor(xq.reshape(m, 3, 8, 8)).float()
        logits = net(xq_t).double().numpy()
        feats = net[:-1](xq_t).double().numpy()
        ffeats = net[:-1](fresh).double().numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    threshold = float(np.median(probs.max(1)))          # some samples on either side
    ref = dpmot_digits.reference(fresh, fresh2, train, net)
    got = dpmot_digits.evaluate(x, ref, net, threshold=threshold)

    f1, f2, tr = fresh.double().numpy().reshape(m, -1), fresh2.double().numpy().reshape(m, -1), \
        train.double().numpy().reshape(n_train, -1)
    pixel_widths = [c * np_median_pairwise(f1) for c in (0.5, 1.0, 2.0)]
    np.testing.assert_allclose(ref['pixel_widths'], pixel_widths, rtol=1e-6)
    assert got['sw2'] == pytest.approx(np_sliced_w2(xq, f1, _directions(xq.shape[1])), rel=1e-6)
    assert got['mmd2'] == pytest.approx(np_mmd2(xq, f1, pixel_widths), rel=1e-6, abs=1e-10)
    assert got['copy'] == pytest.approx(np_median_nn(xq, tr) / np_median_nn(f2, tr), rel=1e-6)
    assert got['distinct'] == 1.0

    assert 0 < got['unreadable'] < 1
    assert got['unreadable'] == pytest.approx(np.mean(probs.max(1) < threshold))
    hist = np.bincount(probs.argmax(1), minlength=10) / m
    assert got['class_tv'] == pytest.approx(0.5 * np.abs(hist - 0.1).sum())
    feature_widths = [c * np_median_pairwise(ffeats) for c in (0.5, 1.0, 2.0)]
    assert got['feat_mmd2'] == pytest.approx(np_mmd2(feats, ffeats, feature_widths), rel=1e-5, abs=1e-9)


def test_gaussian_mixture_evaluate_matches_independent_metrics():
    # dpmot_quality.evaluate: the distances, the share beyond every mode's 99.9 % radius and the nearest-mode TV.
    rng = np.random.default_rng(4)
    means = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    weights = np.array([0.5, 0.3, 0.2])
    std, m = 0.1, 30
    x = means[rng.integers(0, 3, m)] + rng.normal(0, std, (m, 3))
    x[:4] = rng.uniform(-1, 3, (4, 3))                        # some far from every mode
    fresh, fresh2 = rng.normal(size=(m, 3)), rng.normal(size=(m, 3))
    train = rng.normal(size=(9, 3))
    got = dpmot_quality.evaluate(torch.as_tensor(x), torch.as_tensor(fresh), torch.as_tensor(fresh2), means,
                                 weights, std, torch.as_tensor(train))
    d = np.linalg.norm(x[:, None] - means[None], axis=2)
    radius = std * np.sqrt(scipy.stats.chi2.ppf(0.999, 3))
    assert got['mixture'] == pytest.approx(np.mean(d.min(1) > radius)) and 0 < got['mixture'] < 1
    hist = np.bincount(d.argmin(1), minlength=3) / m
    assert got['mode_tv'] == pytest.approx(0.5 * np.abs(hist - weights).sum())
    assert got['sw2'] == pytest.approx(np_sliced_w2(x, fresh, _directions(3)), rel=1e-9)
    assert got['mmd2'] == pytest.approx(np_mmd2(x, fresh, (0.2, 1.0, 5.0)), rel=1e-9, abs=1e-12)
    assert got['copy'] == pytest.approx(np_median_nn(x, train) / np_median_nn(fresh2, train), rel=1e-9)
