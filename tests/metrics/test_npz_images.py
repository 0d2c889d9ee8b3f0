"""metrics.npz_images: ADM-style sample batches are read as image data sets, and a header is checked first."""

import io
import zipfile

import numpy as np
import pytest

from metrics.npz_images import NpzImages, NpzImagesError


def test_reads_arr_0_as_chw_images(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=[5, 6, 7, 3], dtype=np.uint8)
    np.savez(tmp_path / 'b.npz', arr_0=arr, arr_1=np.arange(5))
    ds = NpzImages(tmp_path / 'b.npz')
    assert len(ds) == 5 and ds.image_shape == [3, 6, 7]
    assert np.array_equal(ds[2], arr[2].transpose(2, 0, 1)) and ds[2].dtype == np.uint8


def _npz_with_header(path, shape, dtype='|u1'):
    """An .npz whose arr_0 header declares `shape` but holds no data: what a hostile file could claim."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, dict(descr=dtype, fortran_order=False, shape=shape))
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('arr_0.npy', header.getvalue())
    return path


@pytest.mark.parametrize('make, match', [
    (lambda p: _npz_with_header(p, (10**9, 256, 256, 3)), 'more than the 16 GiB'),
    (lambda p: np.savez(p, arr_0=np.zeros([2, 4, 4, 3], np.float32)) or p, 'float32'),
    (lambda p: np.savez(p, arr_0=np.zeros([2, 4, 4], np.uint8)) or p, 'uint8 \\[N, H, W, C\\]'),
    (lambda p: np.savez(p, mu=np.zeros(3)) or p, 'holds no array "arr_0"'),
    (lambda p: p.write_bytes(b'not a zip') or p, 'not a readable .npz'),
])
def test_bad_batches_are_refused_before_loading(tmp_path, make, match):
    path = tmp_path / 'x.npz'
    make(path)
    with pytest.raises(NpzImagesError, match=match):
        NpzImages(path)
