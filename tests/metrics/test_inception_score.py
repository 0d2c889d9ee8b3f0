"""metrics.inception_score and metrics.mode_mixture against direct computations on known matrices."""

import itertools

import numpy as np
import pytest
import scipy.special
import scipy.stats

from metrics.inception_score import inception_score
from metrics.mode_mixture import TAUS, mode_mixture_ratio


def test_inception_score_matches_a_direct_computation_on_a_known_logit_matrix():
    logits = np.random.default_rng(0).normal(scale=3.0, size=[100, 7])
    probs = scipy.special.softmax(logits, axis=1)
    mean, std = inception_score(probs, splits=10)
    # Directly: per block of 10 rows, exp of the mean KL(p(y|x) || p(y)) with scipy's relative entropy.
    scores = [np.exp(np.mean([scipy.stats.entropy(p, probs[i:i + 10].mean(0)) for p in probs[i:i + 10]]))
              for i in range(0, 100, 10)]
    assert mean == pytest.approx(np.mean(scores), rel=1e-12) and std == pytest.approx(np.std(scores), rel=1e-9)
    assert 1 < mean < 7


def test_inception_score_closed_forms():
    K = 8
    one_hot = np.eye(K)[np.arange(80) % K]                 # confident and balanced: IS = K in every split
    assert inception_score(one_hot, splits=10) == pytest.approx((K, 0.0))
    assert inception_score(np.full([50, K], 1 / K), splits=5) == pytest.approx((1.0, 0.0))  # no information: 1
    same_class = np.eye(K)[np.zeros(40, dtype=int)]        # confident but one class: 1
    assert inception_score(same_class, splits=4) == pytest.approx((1.0, 0.0))


@pytest.mark.parametrize('bad, match', [(np.ones([5, 3]), 'sum to 1'), (np.full([5, 1], 1.0), 'K >= 2'),
                                        (np.full([5, 2], np.nan), 'finite'), (np.full([3, 2], 0.5), 'splits')])
def test_inception_score_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        inception_score(bad, splits=4)


def test_mode_mixture_ratio_matches_brute_force():
    rng = np.random.default_rng(1)
    probs = scipy.special.softmax(rng.normal(scale=2.0, size=[500, 10]), axis=1)
    probs[:5] = [0.5, 0.3, 0.2] + [0] * 7                 # exactly on thresholds: >= counts
    got = mode_mixture_ratio(probs)
    assert sorted(got) == list(TAUS)
    for tau in TAUS:
        count = 0
        for row in probs:
            count += any(row[i] >= tau and row[j] >= tau for i, j in itertools.combinations(range(10), 2))
        assert got[tau] == count / 500, tau
    assert 0 < got[0.4] < got[0.1] < 1
    assert mode_mixture_ratio(np.eye(4)) == {t: 0.0 for t in TAUS}
    assert mode_mixture_ratio(np.full([3, 2], 0.5), taus=[0.5]) == {0.5: 1.0}
    with pytest.raises(ValueError, match='thresholds'):
        mode_mixture_ratio(np.eye(3), taus=[0.0])
