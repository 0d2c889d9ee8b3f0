"""Tests of training.dataset, training.digits and training.toy (CPU, seconds)."""

import hashlib
import io
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from data import digits, toy
from data.dataset import (DatasetError, ImageFolderDataset, VectorDataset, decode_image, image_header,
                              open_dataset)

#----------------------------------------------------------------------------
# Helpers: tiny image folders and zips.

def png_bytes(arr, mode=None, fmt='PNG'):
    buf = io.BytesIO()
    (PIL.Image.fromarray(arr, mode) if mode else PIL.Image.fromarray(arr)).save(buf, format=fmt)
    return buf.getvalue()


def random_images(n, res=8, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, res, res, channels) if channels == 3 else (n, res, res)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_folder(root, files):
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)
    return str(root)


def write_zip(path, files):
    with zipfile.ZipFile(path, 'w') as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return str(path)


def image_files(images, labels=None, prefix='sub/'):
    files = {f'{prefix}{i:03d}.png': png_bytes(img) for i, img in enumerate(images)}
    if labels is not None:
        files['dataset.json'] = json.dumps({'labels': [[n, int(l)] for n, l in zip(files, labels)]}).encode()
    return files


@pytest.fixture(params=['dir', 'zip'])
def kind(request):
    return request.param


def make_dataset_path(tmp_path, kind, files):
    if kind == 'dir':
        return write_folder(tmp_path / 'data', files)
    return write_zip(tmp_path / 'data.zip', files)

#----------------------------------------------------------------------------
# ImageFolderDataset.

def test_images_and_labels_match_pil(tmp_path, kind):
    images = random_images(7)
    labels = [3, 0, 1, 1, 2, 0, 3]
    path = make_dataset_path(tmp_path, kind, image_files(images, labels))
    ds = ImageFolderDataset(path, use_labels=True)
    assert len(ds) == 7 and ds.image_shape == ds.item_shape == [3, 8, 8] and ds.resolution == 8 and ds.num_channels == 3
    assert ds.label_dim == 4 and ds.has_labels and ds.name == 'data'
    for i in range(7):
        img, label = ds[i]
        assert img.dtype == np.uint8 and img.shape == (3, 8, 8)
        np.testing.assert_array_equal(img, images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(label, np.eye(4, dtype=np.float32)[labels[i]])
    ds_nolabels = ImageFolderDataset(path)
    assert ds_nolabels.label_dim == 0 and not ds_nolabels.has_labels and ds_nolabels[0][1].shape == (0,)


def test_grey_and_jpeg(tmp_path):
    grey = random_images(3, channels=1)
    files = {f'{i}.jpg': png_bytes(g, fmt='JPEG') for i, g in enumerate(grey)}
    path = write_folder(tmp_path / 'g', files)
    ds = ImageFolderDataset(path)
    assert ds.image_shape == [1, 8, 8]
    for i in range(3):
        expected = np.asarray(PIL.Image.open(io.BytesIO(files[f'{i}.jpg'])))
        np.testing.assert_array_equal(ds[i][0][0], expected)


def test_xflip_max_size_and_seed(tmp_path, kind):
    images = random_images(20)
    path = make_dataset_path(tmp_path, kind, image_files(images))
    ds = ImageFolderDataset(path, xflip=True)
    assert len(ds) == 40 and ds.xflip
    np.testing.assert_array_equal(ds[25][0], images[5].transpose(2, 0, 1)[:, :, ::-1])
    np.testing.assert_array_equal(ds[5][0], images[5].transpose(2, 0, 1))

    def chosen(seed):
        ds = ImageFolderDataset(path, max_size=6, random_seed=seed)
        out = []
        for i in range(len(ds)):
            out.append(next(k for k in range(20) if np.array_equal(ds[i][0], images[k].transpose(2, 0, 1))))
        return out
    a, b, c = chosen(0), chosen(0), chosen(1)
    assert len(a) == 6 and len(set(a)) == 6 and a == sorted(a) and a == b and a != c
    np.testing.assert_array_equal(a, np.sort(np.random.default_rng(0).permutation(20)[:6]))
    assert len(ImageFolderDataset(path, max_size=100)) == 20


def test_cache_keeps_decoded_images(tmp_path):
    images = random_images(4)
    path = write_folder(tmp_path / 'd', image_files(images))
    ds = ImageFolderDataset(path, cache=True)
    uncached = ImageFolderDataset(path, cache=False)
    first = [ds[i][0] for i in range(4)]
    uncached[0]
    for name in os.listdir(os.path.join(path, 'sub')):
        os.remove(os.path.join(path, 'sub', name))          # cached images no longer need the files
    for i in range(4):
        np.testing.assert_array_equal(ds[i][0], first[i])
    with pytest.raises(DatasetError, match='000.png: cannot read'):
        uncached[0]


@pytest.mark.parametrize('case', ['mixed_size', 'mixed_channels', 'not_square', 'corrupt', 'resolution'])
def test_inconsistent_images_are_refused(tmp_path, kind, case):
    files = image_files(random_images(3))
    if case == 'mixed_size':
        files['sub/001.png'] = png_bytes(random_images(1, res=9)[0])
    elif case == 'mixed_channels':
        files['sub/001.png'] = png_bytes(random_images(1, channels=1)[0])
    elif case == 'not_square':
        files['sub/001.png'] = png_bytes(np.zeros((8, 6, 3), np.uint8))
        files['sub/000.png'] = files['sub/001.png']
    elif case == 'corrupt':
        files['sub/001.png'] = files['sub/001.png'][:40]
    path = make_dataset_path(tmp_path, kind, files)
    message = {'mixed_size': '001.png: image is 9x9', 'mixed_channels': '001.png: image is 8x8 with 1 channel',
               'not_square': '000.png: image is 6x8, not square', 'corrupt': '001.png',
               'resolution': 'resolution=16'}[case]
    with pytest.raises(DatasetError, match=message):
        ImageFolderDataset(path, resolution=16 if case == 'resolution' else None)


def test_late_checks_when_check_all_is_off(tmp_path):
    files = image_files(random_images(3))
    files['sub/002.png'] = png_bytes(random_images(1, res=9)[0])
    ds = ImageFolderDataset(write_zip(tmp_path / 'd.zip', files), check_all=False)
    ds[0]
    with pytest.raises(DatasetError, match='002.png: image is 9x9'):
        ds[2]


@pytest.mark.parametrize('labels,message', [
    ({'labels': [['sub/000.png', 1]]}, '2 images have no label'),
    ({'labels': [['sub/000.png', 1], ['sub/001.png', 0], ['sub/002.png', 0], ['sub/nope.png', 1]]}, "nope.png"),
    ({'labels': [['sub/000.png', 1], ['sub/000.png', 1]]}, 'labelled twice'),
    ({'labels': [['sub/000.png', -1]]}, 'not a \\[name, non-negative int\\] pair'),
    ({'labels': [['sub/000.png', 'cat']]}, 'not a \\[name, non-negative int\\] pair'),
    ({'labels': {'sub/000.png': 1}}, 'must be a list'),
    ([1, 2], 'expected a JSON object'),
])
def test_labels_that_do_not_match(tmp_path, labels, message):
    files = image_files(random_images(3))
    files['dataset.json'] = json.dumps(labels).encode()
    path = write_folder(tmp_path / 'd', files)
    with pytest.raises(DatasetError, match='dataset.json.*' + message):
        ImageFolderDataset(path, use_labels=True).label_dim


def test_null_labels_and_nonimage_files(tmp_path):
    files = image_files(random_images(2))
    files['dataset.json'] = b'{"labels": null}'
    files['notes.txt'] = b'hello'
    files['.hidden/x.png'] = b'junk'
    ds = ImageFolderDataset(write_folder(tmp_path / 'd', files), use_labels=True)
    assert len(ds) == 2 and ds.label_dim == 0
    with pytest.raises(DatasetError, match='no PNG or JPEG images found'):
        ImageFolderDataset(write_folder(tmp_path / 'e', {'a.txt': b'x'}))
    with pytest.raises(DatasetError, match='no such file'):
        ImageFolderDataset(tmp_path / 'missing')


def test_data_hash_is_sha256_of_sorted_files(tmp_path):
    files = image_files(random_images(3), labels=[0, 1, 0])
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b'\0' + len(files[name]).to_bytes(8, 'little') + files[name])
    ds_dir = ImageFolderDataset(write_folder(tmp_path / 'd', files))
    ds_zip = ImageFolderDataset(write_zip(tmp_path / 'd.zip', dict(reversed(list(files.items())))))
    assert ds_dir.data_hash() == ds_zip.data_hash() == h.hexdigest()
    files['sub/000.png'] = png_bytes(random_images(1, seed=5)[0])
    assert ImageFolderDataset(write_zip(tmp_path / 'e.zip', files)).data_hash() != h.hexdigest()


def _loader_pass(ds, **kwargs):
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, **kwargs)
    return torch.cat([x for x, _ in loader]).numpy()


def test_dataloader_workers_stream_from_zip(tmp_path):
    images = random_images(24)
    ds = ImageFolderDataset(write_zip(tmp_path / 'd.zip', image_files(images)), use_labels=True)
    ds[0]                                                  # opens the zip in this process before forking
    expected = images.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(_loader_pass(ds, num_workers=2), expected)
    np.testing.assert_array_equal(_loader_pass(ds, num_workers=1, multiprocessing_context='spawn'), expected)
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[3][0], expected[3])

#----------------------------------------------------------------------------
# Pixel modes.

def _mode_image(mode, rng):
    if mode == 'I;16':
        return PIL.Image.fromarray(rng.integers(0, 65536, (6, 6), dtype=np.uint16))
    if mode == 'P':
        img = PIL.Image.fromarray(rng.integers(0, 16, (6, 6), dtype=np.uint8), 'L').convert('P')
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return img
    if mode == '1':
        return PIL.Image.fromarray(rng.integers(0, 2, (6, 6), dtype=np.uint8) * 255, 'L').convert('1')
    if mode == 'L':
        return PIL.Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8), 'L')
    return PIL.Image.fromarray(rng.integers(0, 256, (6, 6, len(mode)), dtype=np.uint8), mode)


def _expected_pixels(img):
    """Independent expectation of decode_image's conversion for each mode."""
    mode, arr = img.mode, np.asarray(img)
    if mode == 'I;16':
        return np.round(arr.astype(np.float64) / 257).astype(np.uint8)[:, :, None]
    if mode == 'P':
        pal = np.frombuffer(bytes(img.getpalette()), np.uint8).reshape(-1, 3)
        return pal[arr]
    if mode == '1':
        return (arr.astype(np.uint8) * 255)[:, :, None]
    if mode == 'CMYK':
        cmy, k = arr[:, :, :3].astype(np.float64), arr[:, :, 3:].astype(np.float64)
        return np.round((255 - cmy) * (255 - k) / 255).astype(np.uint8)
    if mode in ('LA', 'RGBA'):
        return arr[:, :, :-1].reshape(6, 6, -1)
    return arr.reshape(6, 6, -1)


@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'I;16', 'P', 'RGB', 'RGBA', 'CMYK'])
def test_modes_convert_to_grey_or_rgb(mode):
    img = _mode_image(mode, np.random.default_rng(0))
    fmt = 'JPEG' if mode == 'CMYK' else 'PNG'
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    data = buf.getvalue()
    reopened = PIL.Image.open(io.BytesIO(data))
    assert reopened.mode == mode
    out = decode_image(data, 'x')
    assert out.dtype == np.uint8 and out.shape[2] == (1 if mode in ('1', 'L', 'LA', 'I;16') else 3)
    assert image_header(data, 'x') == (6, 6, out.shape[2])
    tol = 1 if mode == 'CMYK' else 0
    assert np.abs(out.astype(int) - _expected_pixels(reopened).astype(int)).max() <= tol

#----------------------------------------------------------------------------
# VectorDataset.

def test_vector_dataset(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 50)
    path = tmp_path / 'v.npz'
    np.savez(path, x=x, labels=labels, mean=np.ones(3))
    ds = open_dataset(str(path), use_labels=True)
    assert isinstance(ds, VectorDataset) and len(ds) == 50 and ds.dim == 3 and ds.item_shape == [3] and ds.label_dim == 4
    v, label = ds[7]
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, x[7])
    np.testing.assert_array_equal(label, np.eye(4, dtype=np.float32)[labels[7]])
    np.testing.assert_array_equal(ds.extra_arrays['mean'], np.ones(3))
    sub = VectorDataset(path, max_size=10, random_seed=3)
    keep = np.sort(np.random.default_rng(3).permutation(50)[:10])
    np.testing.assert_array_equal(np.stack([sub[i][0] for i in range(10)]), x[keep])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=50)))
    np.testing.assert_array_equal(batch[0].numpy(), x)
    # Hash: the npz members' raw bytes in sorted order.
    with zipfile.ZipFile(path) as zf:
        h = hashlib.sha256()
        for name in sorted(zf.namelist()):
            data = zf.read(name)
            h.update(name.encode() + b'\0' + len(data).to_bytes(8, 'little') + data)
    assert ds.data_hash() == h.hexdigest()


@pytest.mark.parametrize('case,message', [
    ('no_x', 'no array named "x" \\(found: y\\)'),
    ('float64', 'float32 array \\[N, D\\].*float64'),
    ('1d', 'float32 array \\[N, D\\].*\\[5\\]'),
    ('empty', '\\[0, 3\\]'),
    ('nan', '1 non-finite'),
    ('object', 'pickled'),
    ('npy', 'single .npy array'),
    ('pickle', 'pickled|cannot read'),
    ('labels', '"labels" must be'),
    ('missing', 'no such file'),
])
def test_bad_npz(tmp_path, case, message):
    path = tmp_path / 'bad.npz'
    x = np.zeros((5, 3), np.float32)
    if case == 'no_x':
        np.savez(path, y=x)
    elif case == 'float64':
        np.savez(path, x=x.astype(np.float64))
    elif case == '1d':
        np.savez(path, x=x[:, 0])
    elif case == 'empty':
        np.savez(path, x=x[:0])
    elif case == 'nan':
        x[2, 1] = np.nan
        np.savez(path, x=x)
    elif case == 'object':
        np.savez(path, x=np.array([{'a': 1}, None], dtype=object))
    elif case == 'npy':
        with open(path, 'wb') as f:
            np.save(f, x)
    elif case == 'pickle':
        path.write_bytes(pickle.dumps({'x': x}))
    elif case == 'labels':
        np.savez(path, x=x, labels=np.zeros(4, np.int64))
    with pytest.raises(DatasetError, match=message) as info:
        VectorDataset(path, use_labels=True).label_dim
    assert 'bad.npz' in str(info.value)

#----------------------------------------------------------------------------
# Synthetic digits.

def test_render_digits_is_seeded_and_legible():
    labels = np.tile(np.arange(10), 200)
    train = digits.render_digits(labels, seed=0)
    assert train.shape == (2000, 32, 32) and train.dtype == np.uint8
    np.testing.assert_array_equal(digits.render_digits(labels[:20], seed=0), train[:20])  # independent of N
    test = digits.render_digits(labels[:300], seed=1)
    flat = lambda a: a.reshape(len(a), -1).astype(np.float64) / 255
    a, b = flat(train), flat(test)
    dist = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None, :]
    assert dist.min() > 1.0                                                     # disjoint seeds: no repeats
    # Varied: images of one class are far from identical (one undistorted font would correlate ~1).
    for c in range(10):
        z = flat(train[labels == c][:30])
        z = (z - z.mean(1, keepdims=True)) / np.linalg.norm(z - z.mean(1, keepdims=True), axis=1, keepdims=True)
        assert (z @ z.T)[np.triu_indices(30, 1)].mean() < 0.6
    # Ink on black, every digit visible.
    assert np.median(train[:, 0, :]) == 0 and train.max(axis=(1, 2)).min() > 150
    # Legible: 1-nearest-neighbour on 2000 train digits recognises most test digits (MNIST-like ~0.85).
    accuracy = (labels[dist.argmin(1)] == labels[:300]).mean()
    assert accuracy > 0.75, accuracy
    assert digits.render_digits([7], 0, resolution=20).shape == (1, 20, 20)
    with pytest.raises(ValueError, match='0..9'):
        digits.render_digits([10], 0)


def test_colorize_is_grey_times_color():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    colors = digits.hue_colors(np.array([0, 1 / 6, 1 / 3, 0.5, 2 / 3, 5 / 6, 0.25]))
    np.testing.assert_allclose(colors[:6], [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(colors[6], [0.5, 1, 0], atol=1e-6)
    out = digits.colorize(grey, [0.2, 1.0, 0.5])
    np.testing.assert_array_equal(out[:, :, 1], grey)
    np.testing.assert_array_equal(out[:, :, 0], np.round(grey * np.float32(0.2)).astype(np.uint8))

#----------------------------------------------------------------------------
# Toy sources.

def test_gaussian_matches_its_closed_form():
    out = toy.make_toy('gaussian', 200000, seed=0, dim=4)
    x, mean, cov = out['x'].astype(np.float64), out['mean'], out['cov']
    assert out['x'].dtype == np.float32 and x.shape == (200000, 4)
    np.testing.assert_allclose(np.linalg.eigvalsh(cov), np.linspace(0.5, 2, 4), atol=1e-10)
    np.testing.assert_allclose(x.mean(0), mean, atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.03)
    given = toy.gaussian(1000, np.random.default_rng(0), mean=[1.0, 2.0], cov=np.diag([1.0, 4.0]))
    np.testing.assert_array_equal(given['mean'], [1, 2])
    q = toy.random_rotation(5, np.random.default_rng(1))
    np.testing.assert_allclose(q @ q.T, np.eye(5), atol=1e-12)
    assert np.isclose(np.linalg.det(q), 1)
    with pytest.raises(ValueError, match='positive definite'):
        toy.gaussian(10, np.random.default_rng(0), cov=np.diag([1.0, -1.0]))


def test_two_dimensional_sources():
    rng = np.random.default_rng(0)
    n = 20000
    m = toy.moons(n, rng, noise=0.0)
    x, lab = m['x'].astype(np.float64), m['labels']
    centre = np.where(lab[:, None] == 0, [0.0, 0.0], [1.0, 0.5])
    np.testing.assert_allclose(np.linalg.norm(x - centre, axis=1), 1, atol=1e-6)
    assert np.all((x[lab == 0, 1] >= -1e-6)) and np.all(x[lab == 1, 1] <= 0.5 + 1e-6)

    g = toy.eight_gaussians(n, rng, radius=2.0, std=0.1)
    angles = np.arange(8) * np.pi / 4
    means = 2 * np.stack([np.cos(angles), np.sin(angles)], 1)
    resid = g['x'] - means[g['labels']]
    np.testing.assert_allclose(resid.std(0), 0.1, rtol=0.05)
    np.testing.assert_allclose(np.bincount(g['labels']) / n, 1 / 8, atol=0.01)

    c = toy.checkerboard(n, rng)['x']
    cell = np.floor(c + 2).astype(int)
    assert c.min() >= -2 and c.max() <= 2 and np.all((cell.sum(1) % 2) == 0)

    s = toy.swiss_roll(n, rng, noise=0.0)['x'] / 0.2
    t = np.linalg.norm(s, axis=1)
    np.testing.assert_allclose(s, np.stack([t * np.cos(t), t * np.sin(t)], 1), atol=1e-4)
    assert t.min() >= 1.5 * np.pi - 1e-4 and t.max() <= 4.5 * np.pi + 1e-4

    mix = toy.make_toy('gaussian-mixture', n, seed=3, dim=3)
    assert mix['x'].shape == (n, 3) and mix['means'].shape == (8, 3)
    np.testing.assert_allclose((mix['x'] - mix['means'][mix['labels']]).std(0), 0.5, rtol=0.05)
    with pytest.raises(ValueError, match='2-D'):
        toy.make_toy('moons', 10, 0, dim=3)
    with pytest.raises(ValueError, match='Unknown toy source'):
        toy.make_toy('spiral', 10, 0)


def test_verify_decodes_every_image_and_names_a_truncated_one(tmp_path):
    from tests.conftest import write_image_zip
    path = write_image_zip(tmp_path / 'a.zip', 5)
    ds = ImageFolderDataset(path, xflip=True)
    calls = []
    ds.verify(progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 5) for k in range(1, 6)]     # each raw image once, x-flips or not
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    bad = sorted(entries)[3]
    with zipfile.ZipFile(tmp_path / 'b.zip', 'w') as zf:
        for n, data in entries.items():
            zf.writestr(n, data[:-30] if n == bad else data)
    ds = ImageFolderDataset(tmp_path / 'b.zip')      # the header scan passes it
    with pytest.raises(DatasetError, match=f'{bad}: corrupt or truncated image'):
        ds.verify()


def test_progress_options_change_nothing_but_the_output(tmp_path):
    """The header check and the hash with progress=True give the same dataset and digest as without."""
    from tests.conftest import write_image_zip
    from data.dataset import ImageFolderDataset
    path = write_image_zip(tmp_path / 'a.zip', 5, resolution=4)
    plain, shown = ImageFolderDataset(path), ImageFolderDataset(path, progress=True)
    assert plain.data_hash() == shown.data_hash(progress=True) == ImageFolderDataset(path).data_hash(progress=True)
    assert all((plain[i][0] == shown[i][0]).all() for i in range(len(plain)))
