"""Tests of dataset_tool.py: every source, filter, transform, writer and error, via click's CliRunner."""

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from data import digits
from data.dataset import ImageFolderDataset, VectorDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Builders of tiny sources in the real formats.

def png_bytes(arr, fmt='PNG'):
    buf = io.BytesIO()
    PIL.Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(buf, format=fmt)
    return buf.getvalue()


def make_mnist(folder, n_train=12, n_test=6, gz=True, seed=0):
    """IDX files as in the MNIST distribution; returns {split: (images [N,28,28], labels [N])}."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, prefix, n in (('train', 'train', n_train), ('test', 't10k', n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr, magic in (('images-idx3-ubyte', images, 0x0803), ('labels-idx1-ubyte', labels, 0x0801)):
            data = struct.pack('>I', magic) + struct.pack(f'>{arr.ndim}I', *arr.shape) + arr.tobytes()
            path = os.path.join(folder, f'{prefix}-{kind}' + ('.gz' if gz else ''))
            with (gzip.open if gz else open)(path, 'wb') as f:
                f.write(data)
        out[split] = (images, labels)
    return out


def make_cifar(path, n_per_batch=4, seed=0, protocol=2):
    """A cifar-10-python.tar.gz with pickled batches as in the real format; returns {split: (HWC images, labels)}."""
    rng = np.random.default_rng(seed)
    batches = {f'data_batch_{k}': None for k in range(1, 6)}
    batches['test_batch'] = None
    out = {'train': ([], []), 'test': ([], [])}
    with tarfile.open(path, 'w:gz') as tar:
        for name in batches:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
            blob = pickle.dumps({b'batch_label': name.encode(), b'labels': labels, b'data': data,
                                 b'filenames': [b'x.png'] * n_per_batch}, protocol=protocol)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            split = 'test' if name == 'test_batch' else 'train'
            out[split][0].append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            out[split][1].extend(labels)
    return {s: (np.concatenate(v[0]), np.array(v[1])) for s, v in out.items()}


CELEBA_ATTRS = ['Bald', 'Male', 'Smiling']


def make_celeba(folder, n=8, partition=True, seed=0):
    """A CelebA-like folder: 12x10 JPEGs, attributes and (optionally) partitions; returns (images, attrs, parts)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, 'img_align_celeba'))
    names = [f'{i + 1:06d}.jpg' for i in range(n)]
    attrs = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRS)))
    attrs[:, 1] = np.where(np.arange(n) % 2 == 0, 1, -1)                       # Male: both values in every split
    parts = np.arange(n) % 3
    images = {}
    for name in names:
        img = np.full((12, 10, 3), rng.integers(0, 256, 3), dtype=np.uint8)   # flat colour survives JPEG
        with open(os.path.join(folder, 'img_align_celeba', name), 'wb') as f:
            f.write(png_bytes(img, 'JPEG'))
        images[name] = np.asarray(PIL.Image.open(os.path.join(folder, 'img_align_celeba', name)))
    lines = [str(n), ' '.join(CELEBA_ATTRS)] + [f'{nm} ' + ' '.join(f'{v:2d}' for v in a) for nm, a in zip(names, attrs)]
    with open(os.path.join(folder, 'list_attr_celeba.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    if partition:
        with open(os.path.join(folder, 'list_eval_partition.txt'), 'w') as f:
            f.write(''.join(f'{nm} {p}\n' for nm, p in zip(names, parts)))
    return names, images, attrs, parts


def make_image_folder(folder, images, labels=None):
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f'{"a" if i % 2 else "b"}/deep/{i:03d}.png'
        os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(png_bytes(img))
        names.append(name)
    if labels is not None:
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[n, int(l)] for n, l in zip(names, labels)]}, f)
    return names


def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args], catch_exceptions=False)


def read_zip_dataset(path):
    """(images [N,H,W,C] in file order, labels or None) read back with zipfile + Pillow only."""
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith('.png'))
        images = [np.asarray(PIL.Image.open(io.BytesIO(zf.read(n)))) for n in names]
        labels = None
        if 'dataset.json' in zf.namelist():
            table = dict(json.loads(zf.read('dataset.json'))['labels'])
            labels = np.array([table[n] for n in names])
    images = np.stack([i if i.ndim == 3 else i[:, :, None] for i in images])
    return names, images, labels


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

#----------------------------------------------------------------------------
# Sources.

@pytest.mark.parametrize('gz', [True, False])
def test_mnist_splits_and_classes(tmp_path, gz):
    data = make_mnist(tmp_path / 'mnist', gz=gz)
    for split in ('train', 'test'):
        result = run_tool('--source', tmp_path / 'mnist', '--split', split, '--dest', tmp_path / f'{split}.zip')
        assert result.exit_code == 0, result.output
        names, images, labels = read_zip_dataset(tmp_path / f'{split}.zip')
        assert names[0] == '00000/img00000000.png'
        np.testing.assert_array_equal(images[:, :, :, 0], data[split][0])
        np.testing.assert_array_equal(labels, data[split][1])
    result = run_tool('--source', tmp_path / 'mnist', '--classes', '2,3', '--dest', tmp_path / 'all23.zip')
    assert result.exit_code == 0, result.output
    _, images, labels = read_zip_dataset(tmp_path / 'all23.zip')
    keep = {s: np.isin(data[s][1], [2, 3]) for s in data}
    np.testing.assert_array_equal(images[:, :, :, 0], np.concatenate([data[s][0][keep[s]] for s in ('train', 'test')]))
    assert set(labels) == {2, 3}


def test_mnist_incomplete_or_corrupt(tmp_path):
    make_mnist(tmp_path / 'm')
    os.remove(tmp_path / 'm' / 't10k-labels-idx1-ubyte.gz')
    result = run_tool('--source', tmp_path / 'm', '--split', 'test', '--dest', tmp_path / 'o.zip')
    assert result.exit_code != 0 and 't10k-labels-idx1-ubyte[.gz] missing' in result.output
    with gzip.open(tmp_path / 'm' / 'train-images-idx3-ubyte.gz', 'rb') as f:
        data = f.read()
    with gzip.open(tmp_path / 'm' / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(data[:-5])
    result = run_tool('--source', tmp_path / 'm', '--split', 'train', '--dest', tmp_path / 'o.zip')
    assert result.exit_code != 0 and 'train-images-idx3-ubyte.gz: truncated' in result.output
    assert not os.path.exists(tmp_path / 'o.zip')


@pytest.mark.parametrize('protocol', [2, 4])
def test_cifar10_tarball(tmp_path, protocol):
    data = make_cifar(tmp_path / 'cifar-10-python.tar.gz', protocol=protocol)
    for split in ('train', 'test'):
        dest = tmp_path / f'c{split}.zip'
        result = run_tool('--source', tmp_path / 'cifar-10-python.tar.gz', '--split', split, '--dest', dest)
        assert result.exit_code == 0, result.output
        _, images, labels = read_zip_dataset(dest)
        np.testing.assert_array_equal(images, data[split][0])
        np.testing.assert_array_equal(labels, data[split][1])
    result = run_tool('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'call.zip',
                      '--classes', '4', '--max-images', '3')
    _, images, labels = read_zip_dataset(tmp_path / 'call.zip')
    all_images = np.concatenate([data['train'][0], data['test'][0]])
    all_labels = np.concatenate([data['train'][1], data['test'][1]])
    expected = all_images[all_labels == 4][:3]
    np.testing.assert_array_equal(images, expected)
    assert list(labels) == [4] * len(expected)


def test_celeba_attribute_and_partition(tmp_path):
    names, images, attrs, parts = make_celeba(tmp_path / 'celeba')
    for value in ('1', '-1'):
        dest = tmp_path / f'male{value}.zip'
        result = run_tool('--source', tmp_path / 'celeba', '--attr', 'Male', '--attr-value', value, '--split', 'train',
                          '--transform', 'center-crop', '--resolution', '8x8', '--dest', dest)
        assert result.exit_code == 0, result.output
        _, out, labels = read_zip_dataset(dest)
        keep = [n for n, a, p in zip(names, attrs, parts) if a[1] == int(value) and p == 0]
        assert labels is None and len(out) == len(keep) and out.shape[1:] == (8, 8, 3)
        for img, n in zip(out, keep):
            crop = images[n][1:11]                                   # centred 10x10 of the 12x10 image
            expected = np.asarray(PIL.Image.fromarray(crop).resize((8, 8), PIL.Image.LANCZOS))
            np.testing.assert_array_equal(img, expected)
    result = run_tool('--source', tmp_path / 'celeba', '--attr', 'Beard', '--attr-value', '1', '--dest', tmp_path / 'x.zip',
                      '--transform', 'center-crop', '--resolution', '8x8')
    assert result.exit_code != 0 and 'Beard is not a CelebA attribute' in result.output and 'Male' in result.output
    result = run_tool('--source', tmp_path / 'celeba', '--classes', '1', '--dest', tmp_path / 'x.zip')
    assert result.exit_code != 0 and '--classes needs class labels' in result.output


def test_celeba_without_partition_needs_fraction(tmp_path):
    names, _, _, _ = make_celeba(tmp_path / 'celeba', n=10, partition=False)
    result = run_tool('--source', tmp_path / 'celeba', '--split', 'test', '--dest', tmp_path / 'x.zip')
    assert result.exit_code != 0 and '--split-fraction' in result.output
    counts = []
    for part in ('train', 'test'):
        result = run_tool('--source', tmp_path / 'celeba', '--split-fraction', '0.3', '--split-part', part, '--seed', '5',
                          '--transform', 'center-crop', '--resolution', '4x4', '--dest', tmp_path / f'{part}.zip')
        assert result.exit_code == 0, result.output
        counts.append(len(read_zip_dataset(tmp_path / f'{part}.zip')[1]))
    assert counts == [7, 3]


def test_image_folder_zip_and_labels_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, 6, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 9)
    names = make_image_folder(tmp_path / 'src', images, labels)
    (tmp_path / 'src' / 'README.txt').write_text('not an image')
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out')      # folder output
    assert result.exit_code == 0, result.output
    assert 'skipped 1 non-image files' in result.output
    order = np.argsort(names)                                   # sources are read in sorted name order
    assert listing(tmp_path / 'out') == ['00000/' + f'img{i:08d}.png' for i in range(9)] + ['dataset.json']
    ds = ImageFolderDataset(tmp_path / 'out', use_labels=True)
    for i, k in enumerate(order):
        np.testing.assert_array_equal(ds[i][0], images[k].transpose(2, 0, 1))
        assert ds[i][1].argmax() == labels[k]
    # zip -> zip keeps everything.
    result = run_tool('--source', tmp_path / 'out', '--dest', tmp_path / 'again.zip')
    _, again, again_labels = read_zip_dataset(tmp_path / 'again.zip')
    np.testing.assert_array_equal(again, images[order])
    np.testing.assert_array_equal(again_labels, labels[order])
    result = run_tool('--source', tmp_path / 'again.zip', '--classes', '1', '--dest', tmp_path / 'ones.zip')
    _, ones, ones_labels = read_zip_dataset(tmp_path / 'ones.zip')
    np.testing.assert_array_equal(ones, images[order][labels[order] == 1])


def test_folder_output_uses_thousands_subfolders(tmp_path):
    result = run_tool('--source', 'synthetic-digits', '--classes', '1', '--num', '1001', '--split', 'test',
                      '--resolution', '8x8', '--dest', tmp_path / 'o')
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'o')) == ['00000', '00001', 'dataset.json']
    assert os.listdir(tmp_path / 'o' / '00001') == ['img00001000.png']


def test_transforms(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    make_image_folder(tmp_path / 'src', [wide])
    src = tmp_path / 'src'
    lanczos = lambda a, w, h: np.asarray(PIL.Image.fromarray(a).resize((w, h), PIL.Image.LANCZOS))
    cases = {
        'crop': (['--transform', 'center-crop', '--resolution', '10x10'], lanczos(wide[:, 10:30], 10, 10)),
        'resize': (['--resolution', '16x16'], lanczos(wide, 16, 16)),
    }
    # center-crop-wide to 16x8: the 40x20 crop of aspect 2:1 is the whole image; padded to 16x16.
    padded = np.zeros((16, 16, 3), np.uint8)
    padded[4:12] = lanczos(wide, 16, 8)
    cases['wide'] = (['--transform', 'center-crop-wide', '--resolution', '16x8'], padded)
    for key, (args, expected) in cases.items():
        result = run_tool('--source', src, '--dest', tmp_path / f'{key}.zip', *args)
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(read_zip_dataset(tmp_path / f'{key}.zip')[1][0], expected)
    result = run_tool('--source', src, '--dest', tmp_path / 'x.zip')
    assert result.exit_code != 0 and 'not square' in result.output and not os.path.exists(tmp_path / 'x.zip')
    result = run_tool('--source', src, '--dest', tmp_path / 'x.zip', '--transform', 'center-crop')
    assert result.exit_code != 0 and 'needs --resolution' in result.output
    result = run_tool('--source', src, '--dest', tmp_path / 'x.zip', '--resolution', '10by10')
    assert result.exit_code != 0 and 'WIDTHxHEIGHT' in result.output


def test_colorize_is_a_seeded_tint(tmp_path):
    make_mnist(tmp_path / 'mnist', n_train=10)
    outs = []
    for seed in (0, 0, 1):
        dest = tmp_path / f'col{len(outs)}.zip'
        result = run_tool('--source', tmp_path / 'mnist', '--split', 'train', '--colorize', '--seed', seed, '--dest', dest)
        assert result.exit_code == 0, result.output
        outs.append(read_zip_dataset(dest)[1])
    grey = read_idx_images(tmp_path / 'mnist' / 'train-images-idx3-ubyte.gz')
    out = outs[0]
    assert out.shape == (10, 28, 28, 3)
    for img, g in zip(out, grey):
        # Every pixel is the grey value times one colour: recover it from the brightest pixel.
        k = np.unravel_index(g.argmax(), g.shape)
        color = img[k].astype(np.float64) / g[k]
        assert np.abs(img - np.rint(g[:, :, None] * color[None, None, :])).max() <= 2
        assert color.max() > 0.99 and color.min() < 0.01                      # saturated hue
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    # The tint of an item is a function of (seed, item name) only.
    k = np.unravel_index(grey[0].argmax(), grey[0].shape)
    np.testing.assert_allclose(out[0][k] / grey[0][k], dataset_tool.item_color('mnist/train/0', 0), atol=1 / 200)


def test_colorize_draws_from_the_name_within_the_source(tmp_path):
    """The same image folder, or its zip, in two places gets the same tints: drawn from each file's name within
    the source (its path inside the folder), not from where the source lies."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    outs = []
    for where in ('here', 'elsewhere/deeper'):
        names = make_image_folder(tmp_path / where / 'src', images)
        for source in ('folder', 'zip'):
            src = tmp_path / where / 'src'
            if source == 'zip':
                src = tmp_path / where / 'src.zip'
                with zipfile.ZipFile(src, 'w') as zf:
                    for n in names:
                        zf.write(tmp_path / where / 'src' / n, n)
            dest = tmp_path / where / f'{source}-out.zip'
            result = run_tool('--source', src, '--colorize', '--seed', 3, '--dest', dest)
            assert result.exit_code == 0, result.output
            outs.append(read_zip_dataset(dest))
    for _, imgs, _ in outs[1:]:
        np.testing.assert_array_equal(imgs, outs[0][1])
    # Each output is its grey source image times item_color(the file's name inside the source), up to rounding.
    expected = np.stack([np.rint(img[:, :, None].astype(np.float64) * dataset_tool.item_color(n, 3)[None, None, :])
                         for n, img in zip(names, images)])
    dist = np.abs(expected[:, None] - outs[0][1][None].astype(np.float64)).reshape(len(names), len(names), -1).max(-1)
    assert sorted(dist.argmin(axis=1)) == list(range(len(names))) and dist.min(axis=1).max() <= 2


def read_idx_images(path):
    with gzip.open(path, 'rb') as f:
        data = f.read()
    n, h, w = struct.unpack('>3I', data[4:16])
    return np.frombuffer(data[16:], np.uint8).reshape(n, h, w)


def test_split_fraction_is_disjoint_and_complete(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 4), dtype=np.uint8)
    make_image_folder(tmp_path / 'src', images)
    parts = {}
    for part in ('train', 'test'):
        result = run_tool('--source', tmp_path / 'src', '--split-fraction', '0.25', '--split-part', part,
                          '--dest', tmp_path / f'{part}.zip')
        assert result.exit_code == 0, result.output
        parts[part] = {img.tobytes() for img in read_zip_dataset(tmp_path / f'{part}.zip')[1]}
    assert len(parts['test']) == 5 and len(parts['train']) == 15
    assert parts['test'] | parts['train'] == {img.tobytes() for img in images}
    result = run_tool('--source', tmp_path / 'src', '--split', 'train', '--dest', tmp_path / 'x.zip')
    assert result.exit_code != 0 and 'no split of its own' in result.output
    result = run_tool('--source', tmp_path / 'src', '--split-fraction', '0.25', '--dest', tmp_path / 'x.zip')
    assert result.exit_code != 0 and 'go together' in result.output


def test_synthetic_digits_demo_datasets(tmp_path):
    for split in ('train', 'test'):
        result = run_tool('--source', 'synthetic-digits', '--classes', '2', '--colorize', '--split', split,
                          '--num', '30', '--dest', tmp_path / f'2_{split}.zip')
        assert result.exit_code == 0, result.output
    ds = ImageFolderDataset(tmp_path / '2_train.zip', use_labels=True)
    assert len(ds) == 30 and ds.image_shape == [3, 32, 32] and ds.label_dim == 3 and ds.get_label(0)[2] == 1
    # The train images are exactly the digits drawn from the train seeds, tinted.
    first = ds[0][0].transpose(1, 2, 0)
    grey = digits.render_digit(2, digits.digit_rng(0, dataset_tool.SPLIT_IDS['train'], 2, 0))
    expected = digits.colorize(grey, dataset_tool.item_color('synthetic-digits/train/2/0', 0))
    np.testing.assert_array_equal(first, expected)
    train = {img.tobytes() for img in read_zip_dataset(tmp_path / '2_train.zip')[1]}
    test = {img.tobytes() for img in read_zip_dataset(tmp_path / '2_test.zip')[1]}
    assert not train & test
    result = run_tool('--source', 'synthetic-digits', '--split', 'val', '--dest', tmp_path / 'v.zip')
    assert result.exit_code != 0 and '--split=val' in result.output


def test_synthetic_digits_defaults_via_subprocess(tmp_path):
    dest = tmp_path / 'datasets' / '3_test.zip'
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'dataset_tool.py'), '--source=synthetic-digits',
                           '--classes=3', '--colorize', '--split=test', f'--dest={dest}'],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == dataset_tool.SYNTHETIC_COUNTS['test'] and ds.image_shape == [3, 32, 32]
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'dataset_tool.py'), '--source=synthetic-digits',
                           f'--dest={dest}'], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and 'already exists' in proc.stderr and 'Traceback' not in proc.stderr


def test_toy_sources(tmp_path):
    result = run_tool('--source', 'toy:gaussian', '--dim', '3', '--num', '500', '--seed', '2', '--dest', tmp_path / 'g.npz')
    assert result.exit_code == 0, result.output
    ds = VectorDataset(tmp_path / 'g.npz')
    assert len(ds) == 500 and ds.dim == 3
    np.testing.assert_allclose(np.linalg.eigvalsh(ds.extra_arrays['cov']), [0.5, 1.25, 2.0])
    with np.load(tmp_path / 'g.npz') as npz:
        assert sorted(npz.files) == ['cov', 'mean', 'x']
    for name in ('gaussian-mixture', '8gaussians', 'moons', 'swiss-roll', 'checkerboard'):
        result = run_tool('--source', f'toy:{name}', '--num', '100', '--dest', tmp_path / f'{name}.npz')
        assert result.exit_code == 0, result.output
        assert VectorDataset(tmp_path / f'{name}.npz').dim == 2
    for args, message in [(['--source', 'toy:moons', '--dim', '3'], '2-D'),
                          (['--source', 'toy:spiral'], 'Unknown toy source'),
                          (['--source', 'toy:moons', '--colorize'], '--colorize do(es) not apply to toy'),
                          (['--source', 'synthetic-digits', '--dim', '3'], '--dim do(es) not apply to image')]:
        result = run_tool(*args, '--dest', tmp_path / 'bad.npz')
        assert result.exit_code != 0 and message in result.output, result.output
    result = run_tool('--source', 'toy:moons', '--dest', tmp_path / 'moons.zip')
    assert result.exit_code != 0 and '.npz' in result.output
    assert not os.path.exists(tmp_path / 'bad.npz') and not os.path.exists(tmp_path / 'moons.zip')

#----------------------------------------------------------------------------
# Destinations and errors.

def test_overwrite_rules(tmp_path):
    make_image_folder(tmp_path / 'src', np.zeros((2, 4, 4), np.uint8))
    for dest in (tmp_path / 'o.zip', tmp_path / 'o'):
        assert run_tool('--source', tmp_path / 'src', '--dest', dest).exit_code == 0
        before = listing(tmp_path)
        result = run_tool('--source', tmp_path / 'src', '--dest', dest)
        assert result.exit_code != 0 and 'already exists' in result.output and '--overwrite' in result.output
        assert listing(tmp_path) == before
        result = run_tool('--source', tmp_path / 'src', '--dest', dest, '--overwrite', '--max-images', '1')
        assert result.exit_code == 0, result.output
    assert len(read_zip_dataset(tmp_path / 'o.zip')[0]) == 1
    assert listing(tmp_path / 'o') == ['00000/img00000000.png']
    (tmp_path / 'empty').mkdir()
    assert run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'empty').exit_code == 0
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'src', '--overwrite')
    assert result.exit_code != 0 and 'would contain or replace' in result.output
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.')]          # no temporaries left


@pytest.mark.parametrize('case', ['empty', 'corrupt', 'mixed', 'labels', 'missing', 'filtered'])
def test_bad_sources_leave_nothing(tmp_path, case):
    src = tmp_path / 'src'
    rng = np.random.default_rng(0)
    names = make_image_folder(src, rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8), labels=[0, 1, 0, 1])
    if case == 'empty':
        for n in names:
            os.remove(src / n)
        os.remove(src / 'dataset.json')
        (src / 'notes.txt').write_text('x')
    elif case == 'corrupt':
        (src / names[2]).write_bytes((src / names[2]).read_bytes()[:-20])
    elif case == 'mixed':
        (src / names[3]).write_bytes(png_bytes(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)))
    elif case == 'labels':
        (src / 'dataset.json').write_text(json.dumps({'labels': [[names[0], 1]]}))
    message = {'empty': 'no PNG or JPEG images found (skipped 1 non-image files',
               'corrupt': names[2].split('/')[-1] + ': corrupt or truncated image',
               'mixed': 'image is 6x6 with 3 channel(s), but the first is 5x5',
               'labels': '3 images have no label', 'missing': 'no such file or folder',
               'filtered': 'no images left to write'}[case]
    source = tmp_path / 'nothing' if case == 'missing' else src
    extra = ['--classes', '7'] if case == 'filtered' else []
    dest = tmp_path / 'deep' / 'er' / 'out.zip'
    before = listing(tmp_path)
    result = run_tool('--source', source, '--dest', dest, *extra)
    assert result.exit_code == 1 and message in result.output, result.output
    assert 'Traceback' not in result.output
    assert listing(tmp_path) == before and not os.path.exists(tmp_path / 'deep')
    folder_dest = tmp_path / 'outdir'
    result = run_tool('--source', source, '--dest', folder_dest, *extra)
    assert result.exit_code == 1 and listing(tmp_path) == before and not os.path.exists(folder_dest)
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.')]


def test_help_lists_every_option():
    result = CliRunner().invoke(dataset_tool.main, ['--help'])
    assert result.exit_code == 0
    for option in ('--source', '--dest', '--max-images', '--transform', '--resolution', '--classes', '--colorize',
                   '--split', '--split-fraction', '--split-part', '--attr', '--attr-value', '--num', '--dim',
                   '--seed', '--overwrite', 'synthetic-digits', 'toy:NAME', 'cifar-10-python.tar.gz'):
        assert option in result.output

#----------------------------------------------------------------------------


def test_temporaries_of_an_interrupted_write_are_removed_at_start_up(tmp_path):
    """What a killed dataset_tool left beside its --dest (a zip's temporary file, a folder's temporary folder, a
    folder set aside mid-swap) goes at the next start-up; a live writer's temporary and other files stay."""
    make_image_folder(tmp_path / 'src', np.zeros((2, 4, 4), np.uint8))
    old = 1e9
    left = {'.x.zip.a1b2c3d4.tmp': 'file', '.y.tmp1234.tmp': 'dir', '.y.k9k9k9.old': 'dir'}
    for name, kind in left.items():
        if kind == 'dir':
            (tmp_path / name / '00000').mkdir(parents=True)
            (tmp_path / name / '00000' / 'img00000000.png').write_bytes(b'x' * 100)
            for p in (tmp_path / name / '00000' / 'img00000000.png', tmp_path / name / '00000', tmp_path / name):
                os.utime(p, (old, old))
        else:
            (tmp_path / name).write_bytes(b'x' * 100)
            os.utime(tmp_path / name, (old, old))
    live = tmp_path / f'.x.zip.{os.getpid()}-live.tmp'
    live.write_bytes(b'x')
    for dest in ('x.zip', 'y'):
        result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / dest)
        assert result.exit_code == 0 and 'Removed' in result.output, result.output
    assert sorted(p for p in os.listdir(tmp_path)) == sorted(['src', 'x.zip', 'y', live.name])


def test_symlinked_subfolders_are_named_not_skipped_silently(tmp_path):
    make_image_folder(tmp_path / 'src', np.zeros((2, 4, 4), np.uint8))
    make_image_folder(tmp_path / 'elsewhere', np.zeros((3, 4, 4), np.uint8))
    os.symlink(tmp_path / 'elsewhere', tmp_path / 'src' / 'linked')
    result = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip')
    assert result.exit_code == 0, result.output
    assert "Note: skipped 1 symlinked folder(s), not followed, e.g. 'linked'" in result.output
    assert 'Wrote 2 images' in result.output


@pytest.mark.parametrize('case', ['under-a-file', 'unwritable'])
def test_a_bad_dest_is_a_one_line_error(tmp_path, case):
    from tests.test_train import _unwritable_folder
    make_image_folder(tmp_path / 'src', np.zeros((2, 4, 4), np.uint8))
    (tmp_path / 'afile').write_text('x')
    folder = str(tmp_path / 'afile' / 'sub') if case == 'under-a-file' else _unwritable_folder(tmp_path)
    for dest, source in ((f'{folder}/x.zip', tmp_path / 'src'), (f'{folder}/y', tmp_path / 'src'),
                         (f'{folder}/t.npz', 'toy:moons')):
        result = run_tool('--source', source, '--dest', dest)
        assert result.exit_code == 1 and result.output.startswith(f'Error: --dest={dest}: ') and \
            result.output.count('\n') == 1, result.output


@pytest.mark.parametrize('args,bound', [(['--source', 'toy:gaussian', '--dim', '100000', '--num', '100000'], 'over the bound of 4096'),
                                        (['--source', 'toy:gaussian', '--dim', '4096', '--num', '100000'], 'over the bound of 134217728'),
                                        (['--source', 'toy:moons', '--num', '100000000'], 'over the bound of 134217728'),
                                        (['--source', 'synthetic-digits', '--num', '10000000'], 'over the bound of 100000'),
                                        (['--source', 'synthetic-digits', '--resolution', '100000x100000'], 'over the bound of 67108864')])
def test_what_an_option_asks_for_is_bounded(tmp_path, args, bound):
    dest = tmp_path / ('out.npz' if args[1].startswith('toy:') else 'out.zip')
    result = run_tool(*args, '--dest', dest)
    assert result.exit_code != 0 and bound in result.output, result.output
    assert not os.path.exists(dest)
