"""Shared fixtures: tiny data sets that the tests make themselves."""

import io
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped, saying so, where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device (torch.cuda.is_available() is False)')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope='session')
def one_torch_thread():
    """One intra-op thread for the whole session: the tests use tiny tensors, for which torch's thread
    pool mostly spin-waits (several times slower on a small or shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_image_zip(path, num, resolution=8, channels=3, seed=0, offset=0.0):
    """A zip of `num` random smooth PNG images (EDM layout); `offset` shifts the mean brightness."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, 'w') as zf:
        for i in range(num):
            base = rng.uniform(0, 1, size=(2, 2, channels))
            img = np.kron(base, np.ones((resolution // 2, resolution // 2, 1)))
            img = np.clip(img * 0.6 + 0.2 + offset + rng.normal(0, 0.05, img.shape), 0, 1)
            arr = (img * 255).round().astype(np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(arr[:, :, 0] if channels == 1 else arr).save(buf, format='PNG')
            zf.writestr(f'{i // 1000:05d}/img{i:08d}.png', buf.getvalue())
    return str(path)


def write_vector_npz(path, num, dim=2, seed=0, mean=0.0, scale=1.0):
    """An .npz with a float32 array x [num, dim] ~ N(mean, scale^2 I)."""
    rng = np.random.default_rng(seed)
    np.savez(path, x=(rng.normal(size=(num, dim)) * scale + mean).astype(np.float32))
    return str(path)


@pytest.fixture
def image_domains(tmp_path):
    """Paths of two tiny 8x8 RGB image domains (train and test of each)."""
    d = tmp_path / 'data'
    d.mkdir()
    return dict(data1train=write_image_zip(d / '1_train.zip', 24, seed=1, offset=-0.15),
                data2train=write_image_zip(d / '2_train.zip', 24, seed=2, offset=0.15),
                data1test=write_image_zip(d / '1_test.zip', 8, seed=3, offset=-0.15),
                data2test=write_image_zip(d / '2_test.zip', 8, seed=4, offset=0.15))


@pytest.fixture
def vector_domains(tmp_path):
    """Paths of two 2-D Gaussian domains in .npz files."""
    d = tmp_path / 'data'
    d.mkdir()
    return dict(data1train=write_vector_npz(d / 'a.npz', 256, seed=1, mean=-1.0),
                data2train=write_vector_npz(d / 'b.npz', 256, seed=2, mean=1.0, scale=0.5))
