"""FID, feature statistics and the detector loader, checked against independent computations."""

import os
import pickle
import socket
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import dnnlib
from metrics import detector as detector_lib
from metrics import fid as fid_lib

#----------------------------------------------------------------------------
# Helpers.



def fid_sqrtm(mu1, s1, mu2, s2):
    """FID the textbook way, with scipy.linalg.sqrtm (independent of the eigenvalue route)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def random_stats(rng, d, n=None):
    """A random mean and a random full-rank (or, with n <= d samples, rank n - 1) covariance."""
    if n is None:
        a = rng.standard_normal([d, d])
        sigma = a @ a.T / d + 0.1 * np.eye(d)
    else:
        x = rng.standard_normal([n, d]) * rng.uniform(0.5, 2, size=d)
        sigma = np.cov(x, rowvar=False)
    return rng.standard_normal(d), sigma


def closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1] # Closed once the socket is.

#----------------------------------------------------------------------------
# The distance.

@pytest.mark.parametrize('d', [1, 5, 64, 200])
def test_fid_matches_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, s1 = random_stats(rng, d)
    mu2, s2 = random_stats(rng, d)
    with warnings.catch_warnings():
        warnings.simplefilter('error') # Full-rank statistics must not trigger the offset.
        got = fid_lib.calculate_fid_from_inception_stats(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(fid_sqrtm(mu1, s1, mu2, s2), rel=1e-6)


def test_fid_is_symmetric_and_zero_on_identical_stats():
    rng = np.random.default_rng(1)
    mu1, s1 = random_stats(rng, 40)
    mu2, s2 = random_stats(rng, 40)
    a = fid_lib.calculate_fid_from_inception_stats(mu1, s1, mu2, s2)
    b = fid_lib.calculate_fid_from_inception_stats(mu2, s2, mu1, s1)
    assert a == pytest.approx(b, rel=1e-9)
    assert abs(fid_lib.calculate_fid_from_inception_stats(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


def test_fid_of_commuting_gaussians_closed_form():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid_lib.calculate_fid_from_inception_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)


def test_fid_singular_covariance_warns_and_is_finite():
    rng = np.random.default_rng(3)
    d, eps = 64, 1e-6
    mu1, s1 = random_stats(rng, d, n=10) # Rank 9 < 64.
    mu2, s2 = random_stats(rng, d, n=30)
    with pytest.warns(RuntimeWarning, match='near-singular'):
        got = fid_lib.calculate_fid_from_inception_stats(mu1, s1, mu2, s2, eps=eps)
    assert np.isfinite(got)
    offset = eps * np.eye(d)
    assert got == pytest.approx(fid_sqrtm(mu1, s1 + offset, mu2, s2 + offset), rel=1e-5)
    # Identical singular statistics: ~0; all-zero covariances too.
    with pytest.warns(RuntimeWarning):
        assert abs(fid_lib.calculate_fid_from_inception_stats(mu1, s1, mu1, s1)) < 1e-6
    with pytest.warns(RuntimeWarning):
        zero = fid_lib.calculate_fid_from_inception_stats(mu1, np.zeros([d, d]), mu2, np.zeros([d, d]))
    assert zero == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_fid_rejects_bad_inputs():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match='same length'):
        fid_lib.calculate_fid_from_inception_stats(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match=r'\[4, 4\]'):
        fid_lib.calculate_fid_from_inception_stats(mu, np.eye(3), mu, sigma)
    bad = sigma.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match='sigma_ref holds 1 non-finite'):
        fid_lib.calculate_fid_from_inception_stats(mu, sigma, mu, bad)

#----------------------------------------------------------------------------
# Quantisation and feature statistics.

class _LinearDetector:
    """A detector with known features (flattened pixels as floats), to check the statistics exactly."""
    feature_dim = 12
    device = torch.device('cpu')

    def __call__(self, images):
        return images.reshape(images.shape[0], -1).to(torch.float32)


def test_feature_stats_match_numpy_and_ignore_batching():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=[37, 3, 2, 2], dtype=np.uint8)
    flat = images.reshape(37, -1).astype(np.float64)
    # Uneven input batches, tuples with labels, numpy and torch items, re-cut into detector batches of 5.
    items = [(torch.from_numpy(images[:10]), None), images[10:11], torch.from_numpy(images[11:])]
    mu, sigma = fid_lib.compute_feature_stats(items, _LinearDetector(), batch_size=5)
    np.testing.assert_allclose(mu, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(flat, rowvar=False), rtol=1e-9, atol=1e-9)
    feats = fid_lib.compute_features(items, _LinearDetector(), batch_size=7)
    np.testing.assert_array_equal(feats.numpy(), flat.astype(np.float32))
    mu2, sigma2 = fid_lib.mean_cov(feats)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-9, atol=1e-9)


def test_feature_stats_errors():
    det = _LinearDetector()
    with pytest.raises(TypeError, match='to_uint8'):
        fid_lib.compute_feature_stats([torch.zeros([2, 3, 2, 2])], det)
    with pytest.raises(ValueError, match=r'\[N, C, H, W\]'):
        fid_lib.compute_feature_stats([torch.zeros([3, 2, 2], dtype=torch.uint8)], det)
    with pytest.raises(ValueError, match='at least 2 images, got 1'):
        fid_lib.compute_feature_stats([torch.zeros([1, 3, 2, 2], dtype=torch.uint8)], det)


def test_identical_sets_give_fid_zero_with_standin():
    det = detector_lib.load_detector('standin:0', device='cpu')
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, [24, 3, 16, 16], generator=g, dtype=torch.uint8)
    stats_a = fid_lib.compute_feature_stats([images], det, batch_size=8)
    stats_b = fid_lib.compute_feature_stats([images[:11], images[11:]], det, batch_size=5)
    np.testing.assert_allclose(stats_a[0], stats_b[0], rtol=1e-5, atol=1e-6)
    with pytest.warns(RuntimeWarning, match='near-singular'): # 24 images < 2048 dimensions.
        same = fid_lib.calculate_fid_from_inception_stats(*stats_a, *stats_b)
    other = torch.randint(0, 128, [24, 3, 16, 16], generator=g, dtype=torch.uint8)
    with pytest.warns(RuntimeWarning):
        diff = fid_lib.calculate_fid_from_inception_stats(*stats_a, *fid_lib.compute_feature_stats([other], det))
    assert abs(same) < 1e-4 * diff
    assert diff > 0


def test_ref_stats_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = random_stats(rng, 6)
    path = tmp_path / 'stats.npz'
    fid_lib.save_ref_stats(path, mu, sigma, detector='standin:3', num_images=10)
    mu2, sigma2 = fid_lib.load_ref_stats(str(path))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    _, _, meta = fid_lib.load_ref_stats(path.as_uri(), return_meta=True) # file:// URL
    assert meta == dict(detector='standin:3', num_images=10)
    np.savez(tmp_path / 'bad.npz', mean=mu)
    with pytest.raises(ValueError, match=r"lack \['mu', 'sigma'\].*fid.py ref"):
        fid_lib.load_ref_stats(str(tmp_path / 'bad.npz'))
    with pytest.raises(FileNotFoundError, match='missing.npz'):
        fid_lib.load_ref_stats(str(tmp_path / 'missing.npz'))


def test_select_indices():
    np.testing.assert_array_equal(fid_lib.select_indices(5), np.arange(5))
    idx = fid_lib.select_indices(100, 10, seed=3)
    assert len(set(idx.tolist())) == 10 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, fid_lib.select_indices(100, 10, seed=3))
    with pytest.raises(ValueError, match='only 5.*--num'):
        fid_lib.select_indices(5, 6)

#----------------------------------------------------------------------------
# Detector.

def test_standin_detector_is_deterministic_and_follows_the_call_convention():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, [4, 3, 20, 20], generator=g, dtype=torch.uint8)
    a = detector_lib.load_detector('standin:7', device='cpu')
    b = detector_lib.load_detector('standin:7', device='cpu')
    c = detector_lib.load_detector('standin:8', device='cpu')
    fa = a(images)
    assert fa.shape == (4, detector_lib.FEATURE_DIM) and fa.dtype == torch.float32
    assert torch.equal(fa, b(images))
    assert not torch.allclose(fa, c(images))
    assert a.is_standin and a.name == 'standin:7'
    # Raw-net convention: net(uint8 NCHW, return_features=True); probabilities otherwise.
    assert torch.equal(a.net(images, return_features=True), fa)
    probs = a.net(images)
    assert probs.shape == (4, 1008) and torch.allclose(probs.sum(1), torch.ones(4))
    # 1-channel images are repeated to 3 channels; per-image features do not depend on the batch.
    grey = images[:, :1]
    assert torch.equal(a(grey), a(grey.repeat(1, 3, 1, 1)))
    torch.testing.assert_close(a(images[:1]), fa[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match='to_uint8'):
        a(images.float())
    with pytest.raises(ValueError, match='C = 1 or 3'):
        a(images[:, :2])


def test_detector_spec_resolution(monkeypatch):
    monkeypatch.delenv(detector_lib.DETECTOR_ENV, raising=False)
    assert detector_lib.resolve_detector_spec(None) == detector_lib.DEFAULT_DETECTOR_URL
    assert detector_lib.DEFAULT_DETECTOR_URL.endswith('/inception-2015-12-05.pkl')
    monkeypatch.setenv(detector_lib.DETECTOR_ENV, 'standin:5')
    assert detector_lib.resolve_detector_spec(None) == 'standin:5'
    assert detector_lib.resolve_detector_spec('/x.pkl') == '/x.pkl'
    assert detector_lib.load_detector(device='cpu').name == 'standin:5'
    assert detector_lib.parse_standin_spec('standin') == 0
    assert detector_lib.parse_standin_spec('/a/standin.pkl') is None
    with pytest.raises(ValueError, match='"standin:abc".*integer SEED'):
        detector_lib.parse_standin_spec('standin:abc')


@pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')
def test_detector_loads_from_pickle_and_torchscript_files(tmp_path):
    net = detector_lib.StandInDetector(seed=2)
    images = torch.randint(0, 256, [3, 3, 64, 64], generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    want = net(images, return_features=True)
    with open(tmp_path / 'det.pkl', 'wb') as f:
        pickle.dump(net, f)
    torch.jit.script(net).save(str(tmp_path / 'det.pt'))
    for name in ('det.pkl', 'det.pt'):
        det = detector_lib.load_detector(str(tmp_path / name), device='cpu')
        assert not det.is_standin
        torch.testing.assert_close(det(images), want)


def test_detector_offline_error_names_url_and_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv(dnnlib.util.CACHE_DIR_ENV, str(tmp_path / 'cache'))
    url = f'http://127.0.0.1:{closed_port()}/x.pkl'
    with pytest.raises(detector_lib.DetectorUnavailable) as info:
        detector_lib.load_detector(url, device='cpu', verbose=False)
    msg = str(info.value)
    assert url in msg and '--detector=' in msg and detector_lib.DETECTOR_ENV in msg
    with pytest.raises(detector_lib.DetectorUnavailable, match='no such file.*nope.pkl.*--detector='):
        detector_lib.load_detector(str(tmp_path / 'nope.pkl'), device='cpu')

#----------------------------------------------------------------------------


def _default_cache_path(cache_dir):
    """Where dnnlib.util.open_url caches the default detector URL (its documented layout: md5(url)_name)."""
    import hashlib
    url = detector_lib.DEFAULT_DETECTOR_URL
    return os.path.join(cache_dir, 'downloads', hashlib.md5(url.encode()).hexdigest() + '_' + os.path.basename(url))


def test_the_cached_default_detector_is_checked_against_its_known_sha256(tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setenv('EOT_CACHE_DIR', str(tmp_path))
    monkeypatch.delenv(detector_lib.DETECTOR_ENV, raising=False)
    path = _default_cache_path(tmp_path)
    os.makedirs(os.path.dirname(path))
    with open(path, 'wb') as f:                                  # a replaced cached copy: a pickle that runs code
        pickle.dump(detector_lib.StandInDetector(seed=0), f)
    with pytest.raises(detector_lib.DetectorUnavailable, match='sha256') as err:
        detector_lib.load_detector(None, device='cpu', verbose=False)
    assert path in str(err.value) and detector_lib.DEFAULT_DETECTOR_SHA256[:12] in str(err.value)
    # The same file with the hash it has is loaded: the check compares, nothing else.
    monkeypatch.setattr(detector_lib, 'DEFAULT_DETECTOR_SHA256', hashlib.sha256(open(path, 'rb').read()).hexdigest())
    det = detector_lib.load_detector(None, device='cpu', verbose=False)
    assert det.name == detector_lib.DEFAULT_DETECTOR_URL and not det.is_standin
