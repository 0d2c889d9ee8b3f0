"""Hostile and malformed data files: every one gives a DatasetError naming the file (or a well-defined
conversion), dataset_tool exits with status 1 and leaves nothing behind, and no pickle in a data file
is ever executed. Property-based (hypothesis), a few dozen examples each, seconds in all."""

import contextlib
import io
import json
import os
import pickle
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataset_tool
from data.dataset import DatasetError, ImageFolderDataset, VectorDataset, decode_image

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#----------------------------------------------------------------------------

def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def rgb_png(seed, res=4):
    return png_bytes(PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (res, res, 3), dtype=np.uint8)))


def good_zip_bytes(n=3, compression=zipfile.ZIP_STORED):
    files = {f'img{i}.png': rgb_png(i) for i in range(n)}
    files['dataset.json'] = json.dumps({'labels': [[name, i] for i, name in enumerate(files)]}).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', compression=compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue(), files


def read_all(path):
    """Open with labels and read every item; returns {index: image}."""
    ds = ImageFolderDataset(path, use_labels=True)
    return {i: ds[i][0] for i in range(len(ds))}, ds


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root) for f in fs + ds)


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield d


def tool_must_fail_cleanly(source, root):
    """Run dataset_tool on `source` into root/out.zip and root/outdir; both must fail and leave root unchanged."""
    before = listing(root)
    for dest in ('out.zip', 'outdir'):
        result = CliRunner().invoke(dataset_tool.main, ['--source', source, '--dest', os.path.join(root, dest)])
        assert result.exit_code == 1, (result.output, result.exception)
        assert isinstance(result.exception, SystemExit) and result.output.startswith('Error: ')
        assert listing(root) == before
    return result.output

#----------------------------------------------------------------------------
# Zip archives.

@SETTINGS
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_zip(cut):
    data, _ = good_zip_bytes()
    with workdir() as root:
        path = os.path.join(root, 'd.zip')
        with open(path, 'wb') as f:
            f.write(data[:int(cut * len(data))])
        with pytest.raises(DatasetError, match='d.zip'):
            read_all(path)
        assert 'd.zip' in tool_must_fail_cleanly(path, root)


@SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3),
       deflate=st.booleans())
def test_corrupted_zip_bytes(flips, deflate):
    data, files = good_zip_bytes(compression=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    data = bytearray(data)
    for pos, xor in flips:
        data[int(pos * len(data))] ^= xor
    with workdir() as root:
        path = os.path.join(root, 'd.zip')
        with open(path, 'wb') as f:
            f.write(data)
        try:
            images, ds = read_all(path)
        except DatasetError as e:
            assert 'd.zip' in str(e)
            return
        # Whatever was read passed zipfile's CRC check, so it must be the original content.
        for i, img in images.items():
            original = np.asarray(PIL.Image.open(io.BytesIO(files[f'img{i}.png'])))
            np.testing.assert_array_equal(img, original.transpose(2, 0, 1))


SAFE_PARTS = st.sampled_from(['a', 'b', 'sub', 'x y', 'dir.d'])
UNSAFE_NAMES = st.one_of(
    st.lists(SAFE_PARTS, max_size=3).map(lambda p: '/'.join(['..'] + p + ['e.png'])),
    st.lists(SAFE_PARTS, min_size=1, max_size=3).map(lambda p: '/'.join(p[:1] + ['..', '..'] + p[1:] + ['e.png'])),
    st.lists(SAFE_PARTS, max_size=3).map(lambda p: '/' + '/'.join(p + ['e.png'])),
    st.lists(SAFE_PARTS, max_size=3).map(lambda p: 'C:/' + '/'.join(p + ['e.png'])),
    st.lists(SAFE_PARTS, max_size=3).map(lambda p: '\\'.join(['..'] + p + ['e.png'])),
)


@SETTINGS
@given(bad=UNSAFE_NAMES, safe=st.lists(SAFE_PARTS, max_size=3))
def test_unsafe_entry_names_are_refused(bad, safe):
    with workdir() as root:
        inner = os.path.join(root, 'inner')
        os.mkdir(inner)
        path = os.path.join(inner, 'd.zip')
        with zipfile.ZipFile(path, 'w') as zf:
            zf.writestr('/'.join(safe + ['ok.png']), rgb_png(0))
            zf.writestr(bad, rgb_png(1))
        assert bad in [i.filename for i in zipfile.ZipFile(path).infolist()]
        with pytest.raises(DatasetError, match=r'd\.zip: entry .*(absolute path|outside the archive)'):
            ImageFolderDataset(path)
        # Nothing appears anywhere near the archive, inside or outside the destination.
        tool_must_fail_cleanly(path, root)


@SETTINGS
@given(parts=st.lists(SAFE_PARTS, min_size=0, max_size=3))
def test_safe_nested_names_are_read(parts):
    with workdir() as root:
        path = os.path.join(root, 'd.zip')
        name = '/'.join(parts + ['ok.png'])
        with zipfile.ZipFile(path, 'w') as zf:
            zf.writestr(name, rgb_png(3))
        assert len(ImageFolderDataset(path)) == 1


def test_zip_name_with_invalid_utf8_is_refused(tmp_path):
    path = tmp_path / 'd.zip'
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('caf\u00e9.png', rgb_png(0))                  # stored as UTF-8 with the UTF-8 flag
    raw = path.read_bytes()
    assert raw.count('caf\u00e9'.encode()) == 2                 # local header and central directory
    path.write_bytes(raw.replace('caf\u00e9'.encode(), b'caf\xc3\x28'))   # invalid UTF-8 under the flag
    with pytest.raises(DatasetError, match='d.zip: not a readable zip archive'):
        ImageFolderDataset(path)


def test_folder_names_that_are_not_utf8_are_read(tmp_path):
    root = os.fsencode(tmp_path / 'src')
    os.mkdir(root)
    for k, name in enumerate([b'\xff\xfe.png', b'ok.png']):
        with open(os.path.join(root, name), 'wb') as f:
            f.write(rgb_png(k))
    ds = ImageFolderDataset(os.fsdecode(root))
    assert len(ds) == 2 and ds[0][0].shape == (3, 4, 4) and len(ds.data_hash()) == 64
    result = CliRunner().invoke(dataset_tool.main, ['--source', os.fsdecode(root), '--dest', str(tmp_path / 'o.zip')])
    assert result.exit_code == 0, result.output
    assert len(ImageFolderDataset(tmp_path / 'o.zip')) == 2


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_as_zip_or_image(data):
    with workdir() as root:
        path = os.path.join(root, 'd.zip')
        with open(path, 'wb') as f:
            f.write(data)
        with pytest.raises(DatasetError, match='d.zip'):
            ImageFolderDataset(path)
    try:
        out = decode_image(data, 'x.png')
        assert out.dtype == np.uint8 and out.ndim == 3
    except DatasetError as e:
        assert str(e).startswith('x.png: ')

#----------------------------------------------------------------------------
# Images: decompression bombs and pixel modes.

def with_declared_size(png, width, height):
    """A PNG whose IHDR declares width x height (CRC fixed up), pixel data unchanged."""
    ihdr = bytearray(png[12:29])                               # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack('>II', width, height)
    return png[:12] + bytes(ihdr) + struct.pack('>I', zlib.crc32(bytes(ihdr))) + png[33:]


@SETTINGS
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
def test_declared_huge_sizes_are_refused_before_decoding(width, height):
    png = with_declared_size(rgb_png(0), width, height)
    limit = 1 << 20
    with warnings.catch_warnings():
        warnings.simplefilter('error')                          # Pillow's bomb warning must not leak out
        if width * height > limit:
            with pytest.raises(DatasetError, match='x.png: .*decompression bomb'):
                decode_image(png, 'x.png', max_pixels=limit)
            return
        try:                                                   # small sizes: decoded as declared, or refused
            assert decode_image(png, 'x.png', max_pixels=limit).shape == (height, width, 3)
        except DatasetError as e:
            assert str(e).startswith('x.png: ')


@SETTINGS
@given(width=st.integers(10000, 2**31 - 1), height=st.integers(10000, 2**31 - 1))
def test_default_limit_is_ours_not_pillows(width, height):
    png = with_declared_size(rgb_png(0), width, height)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(DatasetError, match='x.png: .*decompression bomb'):
            decode_image(png, 'x.png')


def test_bomb_inside_a_dataset(tmp_path):
    path = tmp_path / 'd.zip'
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('a.png', rgb_png(0))
        zf.writestr('b.png', with_declared_size(rgb_png(1), 100000, 100000))
    with pytest.raises(DatasetError, match=r'd\.zip:b\.png: image declares .* decompression bomb'):
        ImageFolderDataset(path)
    # A genuine image over a lowered limit is refused the same way.
    with pytest.raises(DatasetError, match='over the limit of 10'):
        decode_image(rgb_png(0), 'small.png', max_pixels=10)
    assert 'b.png' in tool_must_fail_cleanly(str(path), str(tmp_path))


MODES = ['1', 'L', 'LA', 'I;16', 'P', 'RGB', 'RGBA']


def mode_image(mode, h, w, rng):
    if mode == 'I;16':
        return PIL.Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == 'P':
        img = PIL.Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), 'L').convert('P')
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return img
    if mode in ('1', 'L'):
        return PIL.Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), 'L').convert(mode)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)


def expected_pixels(img):
    arr = np.asarray(img)
    if img.mode == 'I;16':
        return np.floor(arr / 257 + 0.5).astype(np.uint8)[:, :, None]
    if img.mode == 'P':
        return np.frombuffer(bytes(img.getpalette()), np.uint8).reshape(-1, 3)[arr]
    if img.mode == '1':
        return (arr * 255).astype(np.uint8)[:, :, None]
    if img.mode in ('LA', 'RGBA'):
        return arr[:, :, :-1]
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


@SETTINGS
@given(mode=st.sampled_from(MODES), h=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_odd_modes_convert_consistently(mode, h, seed):
    img = mode_image(mode, h, h, np.random.default_rng(seed))
    data = png_bytes(img)
    reopened = PIL.Image.open(io.BytesIO(data))
    assert reopened.mode == mode
    np.testing.assert_array_equal(decode_image(data, 'x.png'), expected_pixels(reopened))


@SETTINGS
@given(modes=st.lists(st.sampled_from(MODES), min_size=2, max_size=4), seed=st.integers(0, 2**16))
def test_mixed_modes_in_one_dataset(modes, seed):
    rng = np.random.default_rng(seed)
    grey = [m in ('1', 'L', 'LA', 'I;16') for m in modes]
    with workdir() as root:
        path = os.path.join(root, 'd.zip')
        with zipfile.ZipFile(path, 'w') as zf:
            for k, mode in enumerate(modes):
                zf.writestr(f'{k}.png', png_bytes(mode_image(mode, 5, 5, rng)))
        if all(grey) or not any(grey):
            ds = ImageFolderDataset(path)
            assert ds.num_channels == (1 if grey[0] else 3) and all(ds[i][0].shape[0] == ds.num_channels for i in range(len(ds)))
        else:
            first_differs = grey.index(not grey[0])
            with pytest.raises(DatasetError, match=f'd.zip:{first_differs}.png: image is 5x5 with'):
                ImageFolderDataset(path)


def test_cmyk_jpeg_and_unsupported_modes(tmp_path):
    cmyk = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 6, 4), dtype=np.uint8), 'CMYK')
    buf = io.BytesIO()
    cmyk.save(buf, format='JPEG')
    assert decode_image(buf.getvalue(), 'c.jpg').shape == (6, 6, 3)
    for fmt in ('TIFF', 'BMP', 'GIF'):
        buf = io.BytesIO()
        PIL.Image.new('RGB', (4, 4)).save(buf, format=fmt)
        with pytest.raises(DatasetError, match='x.png: not a PNG or JPEG image'):
            decode_image(buf.getvalue(), 'x.png')

#----------------------------------------------------------------------------
# dataset.json.

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=10)
NAMES = ['a.png', 'b.png', 'c.png']
LABEL_ENTRIES = st.lists(JSON_VALUES | st.tuples(st.sampled_from(NAMES + ['z.png', 'A.png']),
                                                  st.integers(-2, 4) | st.booleans() | st.floats(0, 3) | st.text(max_size=2)
                                                  ).map(list), max_size=5)
VALID_LABELS = st.permutations(NAMES).flatmap(
    lambda names: st.tuples(*[st.integers(0, 3).map(lambda v, n=n: [n, v]) for n in names]).map(list))


def labels_are_valid(obj):
    """Independent statement of the rule: every image exactly once, labels non-negative ints (not bools)."""
    if not isinstance(obj, dict) or 'labels' not in obj:
        return False
    labels = obj['labels']
    if labels is None:
        return True
    if not isinstance(labels, list):
        return False
    for e in labels:
        if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int and e[1] >= 0):
            return False
    return sorted(e[0] for e in labels) == NAMES


@SETTINGS
@given(obj=st.one_of(JSON_VALUES, st.fixed_dictionaries({'labels': LABEL_ENTRIES | VALID_LABELS})),
       raw=st.none() | st.binary(max_size=20))
def test_malformed_dataset_json(obj, raw):
    data = raw if raw is not None else json.dumps(obj).encode()
    with workdir() as root:
        path = os.path.join(root, 'd.zip')
        with zipfile.ZipFile(path, 'w') as zf:
            for k, name in enumerate(NAMES):
                zf.writestr(name, rgb_png(k))
            zf.writestr('dataset.json', data)
        try:
            parsed = json.loads(data.decode('utf-8'))
        except ValueError:
            parsed = None
            valid = False
        else:
            valid = labels_are_valid(parsed)
        ds = ImageFolderDataset(path, use_labels=True)
        if valid:
            labels = parsed['labels']
            assert ds.label_dim == (0 if labels is None else max(e[1] for e in labels) + 1)
            if labels:
                table = dict((e[0], e[1]) for e in labels)
                assert [ds.get_label(i).argmax() for i in range(3)] == [table[n] for n in NAMES]
        else:
            with pytest.raises(DatasetError, match='d.zip:dataset.json: '):
                ds.label_dim
            assert 'dataset.json' in tool_must_fail_cleanly(path, root)

#----------------------------------------------------------------------------
# Pickles and .npz files: never executed.

class Boom:
    """Unpickling this creates the file `marker` (the stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_npz_object_arrays_and_pickles_are_never_loaded(tmp_path):
    marker = str(tmp_path / 'executed')
    cases = {}
    buf = io.BytesIO()
    np.savez(buf, x=np.array([Boom(marker)], dtype=object))
    cases['object.npz'] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((2, 2), np.float32), extra=np.array([Boom(marker)], dtype=object))
    cases['extra.npz'] = buf.getvalue()
    cases['pickle.npz'] = pickle.dumps({'x': Boom(marker)})
    buf = io.BytesIO()
    np.save(buf, np.array([Boom(marker)], dtype=object))
    cases['npy.npz'] = buf.getvalue()
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=f'{name}: (holds pickled|cannot read)'):
            VectorDataset(tmp_path / name)
    assert not os.path.exists(marker)


@SETTINGS
@given(data=st.binary(max_size=400), prefix=st.sampled_from([b'', b'PK\x03\x04', b'\x93NUMPY']))
def test_random_npz_bytes(data, prefix):
    with workdir() as root:
        path = os.path.join(root, 'v.npz')
        with open(path, 'wb') as f:
            f.write(prefix + data)
        with pytest.raises(DatasetError, match='v.npz'):
            VectorDataset(path)


def cifar_tar(path, blob):
    with tarfile.open(path, 'w:gz') as tar:
        for k in range(1, 6):
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{k}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        info = tarfile.TarInfo('cifar-10-batches-py/test_batch')
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize('payload', ['global', 'object_array', 'codecs'])
def test_cifar_pickles_are_restricted(tmp_path, payload):
    marker = str(tmp_path / 'executed')
    if payload == 'global':
        blob = pickle.dumps({b'data': Boom(marker), b'labels': [0]}, protocol=2)
    elif payload == 'object_array':
        blob = pickle.dumps({b'data': np.array([Boom(marker)], dtype=object), b'labels': [0]}, protocol=2)
    else:  # _codecs.encode is allowed for latin1 only
        blob = b'\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x05\x00\x00\x00rot13q\x02\x86q\x03Rq\x04.'
    path = tmp_path / 'cifar-10-python.tar.gz'
    cifar_tar(path, blob)
    root = tmp_path / 'work'
    root.mkdir()
    message = tool_must_fail_cleanly(str(path), str(root))
    assert 'data_batch_1: not a plain CIFAR batch pickle' in message
    assert not os.path.exists(marker)
    with pytest.raises(DatasetError, match='is not allowed|refusing'):
        dataset_tool.restricted_unpickle(blob, 'x')


@SETTINGS
@given(data=st.binary(max_size=200))
def test_random_bytes_as_cifar_batch(data):
    try:
        obj = dataset_tool.restricted_unpickle(data, 'batch')
    except DatasetError as e:
        assert str(e).startswith('batch: ')
        return
    with contextlib.suppress(DatasetError):
        dataset_tool._cifar_batch(obj, 'batch')

#----------------------------------------------------------------------------
