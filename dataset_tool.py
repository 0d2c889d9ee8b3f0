"""Build image datasets (zip or folder, EDM layout) and toy vector datasets (.npz).

The click command at the bottom only parses options; the sources, filters, transforms and writers
above it are importable functions.
"""

import contextlib
import gzip
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections import namedtuple
from functools import partial

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

from dnnlib.util import atomic_write, output_dir_problem, remove_stale_temporaries, temporary_prefix
from data import digits, toy
from data.dataset import (LABELS_FILE, MAX_IMAGE_PIXELS, DatasetError, RawFiles, check_entry_name, decode_image,
                          image_names, parse_labels)

#----------------------------------------------------------------------------
# Sources. Each yields Items; an item's pixels are loaded only when it is written.

# name: shown in messages; key: the item's name within its source (not where the source lies), which --colorize
# draws its tint from (None: the name). load() -> uint8 HWC; label int or None; attrs dict or None.
Item = namedtuple('Item', ['name', 'load', 'label', 'attrs', 'key'], defaults=[None])
Source = namedtuple('Source', ['kind', 'items', 'has_labels', 'notes'])

SPLITS = ('train', 'val', 'test', 'all')
SYNTHETIC = 'synthetic-digits'
SYNTHETIC_COUNTS = dict(train=4000, test=1000)   # per class
SPLIT_IDS = dict(train=0, val=1, test=2)         # keep the seeds of different splits disjoint
MAX_DIGITS_PER_CLASS = 100_000                  # --num bound for synthetic digits (each item is listed up front)
MAX_IDX_ITEMS = 1 << 31


def _select_own_split(kind, split, available):
    """The list of own splits to read for --split, or an error when the source has no such split."""
    if split == 'all':
        return list(available)
    if split not in available:
        hint = (f'it has {", ".join(available)}' if available else
                'it has no split of its own; use --split-fraction=0.1 --split-part=train|test')
        raise DatasetError(f'--split={split} does not apply to this {kind} source: {hint}')
    return [split]


def _array_item(name, image, label):
    return Item(name, partial(np.asarray, image), label, None)


def read_idx(path, ndim):
    """An unsigned-byte IDX array (the MNIST format) from a raw or .gz file, checked against its header."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            head = f.read(4)
            if len(head) != 4 or head[:2] != b'\0\0' or head[2] != 0x08 or head[3] != ndim:
                raise DatasetError(f'{path}: not an unsigned-byte IDX file with {ndim} dimensions '
                                   f'(magic bytes {head.hex() or "missing"})')
            dims = struct.unpack(f'>{ndim}I', f.read(4 * ndim))
            count = int(np.prod(dims, dtype=np.int64))
            if count > MAX_IDX_ITEMS:
                raise DatasetError(f'{path}: header declares {dims}, too large')
            data = f.read(count)
            if len(data) != count:
                raise DatasetError(f'{path}: truncated: header declares {dims} = {count} bytes, found {len(data)}')
            if f.read(1):
                raise DatasetError(f'{path}: has data beyond the {dims} declared by its header')
    except DatasetError:
        raise
    except (OSError, EOFError, struct.error, zlib.error) as e:
        raise DatasetError(f'{path}: cannot read IDX file ({type(e).__name__}: {e})') from e
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


MNIST_FILES = dict(train=('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                   test=('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'))


def _find_mnist_file(folder, base):
    for name in (base, base.replace('-idx', '.idx')):
        for ext in ('', '.gz'):
            if os.path.isfile(os.path.join(folder, name + ext)):
                return os.path.join(folder, name + ext)
    return None


def is_mnist_dir(folder):
    return any(_find_mnist_file(folder, base) for pair in MNIST_FILES.values() for base in pair)


def open_mnist(folder, split):
    """MNIST-format IDX files in a folder (train-*/t10k-*, raw or .gz): grey images with labels."""
    available = [s for s, pair in MNIST_FILES.items() if any(_find_mnist_file(folder, b) for b in pair)]
    items = []
    for s in _select_own_split('MNIST', split, available):
        paths = [_find_mnist_file(folder, b) for b in MNIST_FILES[s]]
        if None in paths:
            missing = [b for b, p in zip(MNIST_FILES[s], paths) if p is None]
            raise DatasetError(f'{folder}: MNIST {s} split is incomplete: {", ".join(missing)}[.gz] missing')
        images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
        if len(images) != len(labels):
            raise DatasetError(f'{paths[1]}: {len(labels)} labels for the {len(images)} images of {paths[0]}')
        items += [_array_item(f'mnist/{s}/{i}', images[i][:, :, None], int(labels[i])) for i in range(len(images))]
    return Source('MNIST', items, True, [])


def _latin1_encode(text, encoding='latin1'):
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1'); allow only that.
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError(f'refusing _codecs.encode({type(text).__name__}, {encoding!r})')
    return text.encode('latin1')


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain builtins and numpy arrays (the CIFAR batch format); any other global is refused.

    CIFAR-10's python tarball is the one data format we read that is a pickle. Its content is a dict of
    bytes, lists, ints and uint8 arrays, so nothing else needs to be constructible; refusing every other
    global means a tampered file cannot run code.
    """

    _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                ('numpy', 'ndarray'), ('numpy', 'dtype')}

    def find_class(self, module, name):
        if (module, name) == ('_codecs', 'encode'):
            return _latin1_encode
        if (module, name) in self._ALLOWED:
            if module.endswith('multiarray'):
                return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, whatever its module
            return getattr(np, name)
        raise pickle.UnpicklingError(f'global {module}.{name} is not allowed in a data file')


def restricted_unpickle(data, source):
    """Unpickle bytes with RestrictedUnpickler; DatasetError on any problem.

    The opcodes are scanned first (pickletools checks every declared length against the data), so a
    corrupt length cannot make the unpickler allocate gigabytes; out-of-band buffers are refused.
    """
    try:
        for opcode, _arg, _pos in pickletools.genops(data):
            if opcode.name in ('BYTEARRAY8', 'NEXT_BUFFER', 'READONLY_BUFFER'):
                raise pickle.UnpicklingError(f'opcode {opcode.name} is not allowed in a data file')
        return RestrictedUnpickler(io.BytesIO(data), encoding='bytes').load()
    except Exception as e:
        raise DatasetError(f'{source}: not a plain CIFAR batch pickle ({type(e).__name__}: {e})') from e


CIFAR_MEMBERS = dict(train=[f'cifar-10-batches-py/data_batch_{k}' for k in range(1, 6)],
                     test=['cifar-10-batches-py/test_batch'])


def _cifar_batch(obj, source):
    get = lambda d, k: d.get(k.encode(), d.get(k)) if isinstance(d, dict) else None
    data, labels = get(obj, 'data'), get(obj, 'labels')
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f'{source}: "data" must be a uint8 array [N, 3072]')
    if not isinstance(labels, list) or len(labels) != len(data) or \
            not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 9 for v in labels):
        raise DatasetError(f'{source}: "labels" must be a list of {len(data)} ints in 0..9')
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def open_cifar10(path, split):
    """The CIFAR-10 python tarball (cifar-10-python.tar.gz): 32x32 RGB images with labels."""
    try:
        tar = tarfile.open(path, 'r:*')
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f'{path}: not a readable tar archive ({type(e).__name__}: {e})') from e
    items = []
    with tar:
        try:
            members = {m.name: m for m in tar.getmembers()}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DatasetError(f'{path}: corrupt tar archive ({type(e).__name__}: {e})') from e
        available = [s for s, names in CIFAR_MEMBERS.items() if all(n in members for n in names)]
        if not available:
            raise DatasetError(f'{path}: no CIFAR-10 batches inside (expected {CIFAR_MEMBERS["test"][0]} ...); '
                               'pass the original cifar-10-python.tar.gz')
        for s in _select_own_split('CIFAR-10', split, available):
            for member_name in CIFAR_MEMBERS[s]:
                member = members[member_name]
                source = f'{path}:{member_name}'
                if not member.isfile() or member.size > (1 << 28):
                    raise DatasetError(f'{source}: not a regular file of plausible size')
                try:
                    data = tar.extractfile(member).read()
                except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                    raise DatasetError(f'{source}: cannot read ({type(e).__name__}: {e})') from e
                images, labels = _cifar_batch(restricted_unpickle(data, source), source)
                base = len(items)
                items += [_array_item(f'cifar10/{s}/{base + i}', images[i], labels[i]) for i in range(len(images))]
    return Source('CIFAR-10', items, True, [])


def _read_text_lines(path):
    try:
        with open(path, 'r', encoding='utf-8') as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f'{path}: cannot read ({type(e).__name__}: {e})') from e


def _load_file_image(path):
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f'{path}: cannot read image ({e.strerror})') from e
    return decode_image(data, path)


def open_celeba(folder, split):
    """A CelebA folder: list_attr_celeba.txt, img_align_celeba/ and optionally list_eval_partition.txt.

    Items carry their 40 attributes (+1 / -1) for --attr filtering; there are no class labels.
    """
    attr_path = os.path.join(folder, 'list_attr_celeba.txt')
    lines = [line.split() for line in _read_text_lines(attr_path)]
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise DatasetError(f'{attr_path}: expected a count on line 1 and attribute names on line 2')
    attr_names = lines[1]
    rows = [r for r in lines[2:] if r]
    if len(rows) != int(lines[0][0]):
        raise DatasetError(f'{attr_path}: line 1 announces {lines[0][0]} images, but {len(rows)} rows follow')
    attrs = {}
    for k, row in enumerate(rows):
        if len(row) != len(attr_names) + 1 or any(v not in ('1', '-1') for v in row[1:]):
            raise DatasetError(f'{attr_path}: line {k + 3} should be a file name and {len(attr_names)} values of 1 or -1')
        check_entry_name(row[0], attr_path)
        attrs[row[0]] = {a: int(v) for a, v in zip(attr_names, row[1:])}

    part_path = os.path.join(folder, 'list_eval_partition.txt')
    partition = None
    if os.path.isfile(part_path):
        partition = {}
        for k, row in enumerate(line.split() for line in _read_text_lines(part_path)):
            if not row:
                continue
            if len(row) != 2 or row[1] not in ('0', '1', '2'):
                raise DatasetError(f'{part_path}: line {k + 1} should be a file name and 0, 1 or 2')
            partition[row[0]] = ('train', 'val', 'test')[int(row[1])]
        missing = [n for n in attrs if n not in partition]
        if missing:
            raise DatasetError(f'{part_path}: no partition for {len(missing)} images, e.g. {missing[0]!r}')
    splits = _select_own_split('CelebA', split, ['train', 'val', 'test'] if partition else [])

    image_dir = os.path.join(folder, 'img_align_celeba')
    if not os.path.isdir(image_dir):
        raise DatasetError(f'{folder}: no img_align_celeba/ folder next to list_attr_celeba.txt')
    items = [Item(f'img_align_celeba/{n}', partial(_load_file_image, os.path.join(image_dir, n)), None, a)
             for n, a in attrs.items() if partition is None or partition[n] in splits]
    return Source('CelebA', items, False, [])


def open_image_files(path):
    """A folder (recursive) or zip of PNG/JPEG images, with labels from its dataset.json if present."""
    raw = RawFiles(path)
    names, others = image_names(raw)
    notes = []
    if others:
        notes.append(f'skipped {len(others)} non-image files, e.g. {others[0]!r}')
    if raw.skipped_links:
        notes.append(f'skipped {len(raw.skipped_links)} symlinked folder(s), not followed, e.g. {raw.skipped_links[0]!r} '
                     '(pass the folder it points to as a --source of its own, or copy it in)')
    if not names:
        raise DatasetError(f'{path}: no PNG or JPEG images found' + (f' ({notes[0]})' if notes else ''))
    labels = None
    if LABELS_FILE in raw.names:
        labels = parse_labels(raw.read(LABELS_FILE), raw.describe(LABELS_FILE), names)
    load = lambda n: decode_image(raw.read(n), raw.describe(n))
    items = [Item(raw.describe(n), partial(load, n), None if labels is None else int(labels[i]), None, key=n)
             for i, n in enumerate(names)]
    return Source('image ' + ('zip' if raw.kind == 'zip' else 'folder'), items, labels is not None, notes)


def open_synthetic_digits(split, classes, num, seed, resolution):
    """Freshly drawn digits (data.digits): `num` per class per split (default 4000 train, 1000 test).

    Image i of class c in split s is drawn from digit_rng(seed, SPLIT_IDS[s], c, i), so the train and
    test splits come from disjoint seeds. Items are interleaved across classes.
    """
    classes = list(range(10)) if classes is None else classes
    bad = [c for c in classes if not 0 <= c <= 9]
    if bad:
        raise DatasetError(f'--classes: synthetic digits have classes 0..9, not {bad}')
    if num is not None and num > MAX_DIGITS_PER_CLASS:
        raise DatasetError(f'--num={num}: over the bound of {MAX_DIGITS_PER_CLASS} synthetic digits per class and split')
    items = []
    for s in _select_own_split('synthetic-digits', split, ['train', 'test']):
        for i in range(SYNTHETIC_COUNTS[s] if num is None else num):
            for c in classes:
                rng = partial(digits.digit_rng, seed, SPLIT_IDS[s], c, i)
                load = partial(lambda c, rng: digits.render_digit(c, rng(), resolution)[:, :, None], c, rng)
                items.append(Item(f'{SYNTHETIC}/{s}/{c}/{i}', load, c, None))
    return Source(SYNTHETIC, items, True, [])


def open_source(source, split='all', classes=None, num=None, seed=0, resolution=32):
    """Open an image source by its --source string. See the command's help for the accepted sources."""
    if source == SYNTHETIC:
        return open_synthetic_digits(split, classes, num, seed, resolution)
    if num is not None:
        raise DatasetError(f'--num applies to --source={SYNTHETIC} and toy sources only, not to {source}')
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, 'list_attr_celeba.txt')):
            return open_celeba(source, split)
        if is_mnist_dir(source):
            return open_mnist(source, split)
        _select_own_split('image folder', split, [])
        return open_image_files(source)
    if os.path.isfile(source):
        if source.lower().endswith(('.tar.gz', '.tgz', '.tar')):
            return open_cifar10(source, split)
        _select_own_split('image zip', split, [])
        return open_image_files(source)
    raise DatasetError(f'--source={source}: no such file or folder (or use {SYNTHETIC} or toy:NAME)')

#----------------------------------------------------------------------------
# Filters and transforms.

def fraction_split(items, fraction, part, seed):
    """A seeded random split: 'test' is round(fraction * N) items, 'train' the rest; order is kept."""
    n_test = int(round(fraction * len(items)))
    is_test = np.zeros(len(items), dtype=bool)
    is_test[np.random.default_rng(seed).permutation(len(items))[:n_test]] = True
    return [it for it, t in zip(items, is_test) if t == (part == 'test')]


def select_items(source, classes=None, attr=None, attr_value=None, split_fraction=None, split_part=None,
                 seed=0, max_images=None):
    """Apply --split-fraction, --classes, --attr and --max-images (in that order) to a Source's items."""
    items = source.items
    if split_fraction is not None:
        items = fraction_split(items, split_fraction, split_part, seed)
    if classes is not None:
        if not source.has_labels:
            raise DatasetError(f'--classes needs class labels, but this {source.kind} source has none')
        keep = set(classes)
        items = [it for it in items if it.label in keep]
    if attr is not None:
        if source.kind != 'CelebA':
            raise DatasetError(f'--attr applies to CelebA folders only, not to this {source.kind} source')
        names = source.items[0].attrs.keys() if source.items else []
        if attr not in names:
            raise DatasetError(f'--attr={attr} is not a CelebA attribute; choose one of {", ".join(names)}')
        items = [it for it in items if it.attrs[attr] == attr_value]
    if max_images is not None:
        items = items[:max_images]
    return items


def _pil(img):
    return PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)


def _from_pil(img):
    arr = np.asarray(img)
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def resize(img, width, height):
    """Resize uint8 HWC to height x width (Lanczos); unchanged if already that size."""
    if img.shape[:2] == (height, width):
        return img
    return _from_pil(_pil(img).resize((width, height), PIL.Image.LANCZOS))


def center_crop(img, width, height):
    """Crop the largest centred square, then resize to height x width."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return resize(img[top:top + s, left:left + s], width, height)


def center_crop_wide(img, width, height):
    """Crop the centre to the aspect ratio width:height, resize, and pad top/bottom with black to width x width."""
    if height > width:
        raise DatasetError(f'--transform=center-crop-wide needs width >= height, got {width}x{height}')
    h, w = img.shape[:2]
    ch = int(round(w * height / width))        # crop height at full image width
    if ch <= h:
        top = (h - ch) // 2
        crop = img[top:top + ch]
    else:                                       # image too wide: crop the width instead
        cw = int(round(h * width / height))
        left = (w - cw) // 2
        crop = img[:, left:left + cw]
    out = np.zeros([width, width, img.shape[2]], dtype=np.uint8)
    top = (width - height) // 2
    out[top:top + height] = resize(crop, width, height)
    return out


TRANSFORMS = {'center-crop': center_crop, 'center-crop-wide': center_crop_wide}


def item_color(name, seed):
    """The random tint of an item for --colorize: a saturated hue drawn from (seed, crc32 of its name within its
    source), so the same source gives the same colours wherever it lies."""
    hue = np.random.default_rng([int(seed), zlib.crc32(name.encode('utf-8', 'surrogateescape'))]).random()
    return digits.hue_colors([hue])[0]


def to_grey(img):
    """uint8 HW1 from HW1 or HW3 (ITU-R 601 luma, as Pillow's convert('L'))."""
    return img if img.shape[2] == 1 else _from_pil(_pil(img).convert('L'))


def process_image(item, img, transform=None, resolution=None, colorize_seed=None):
    """Apply the transform / resize and the optional tint to one loaded image (uint8 HWC)."""
    if transform is not None:
        img = TRANSFORMS[transform](img, *resolution)
    elif resolution is not None:
        img = resize(img, *resolution)
    if colorize_seed is not None:
        key = item.name if item.key is None else item.key
        img = digits.colorize(to_grey(img)[:, :, 0], item_color(key, colorize_seed))
    return img

#----------------------------------------------------------------------------
# Writers: a zip via atomic_write, or a folder built beside the destination and renamed into place.

def _encode_png(img):
    buf = io.BytesIO()
    _pil(img).save(buf, format='PNG')
    return buf.getvalue()


@contextlib.contextmanager
def _created_parents(path):
    """Create the missing parent folders of `path`; remove them again (if still empty) on failure."""
    created = []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(created):
        os.mkdir(d)
    try:
        yield
    except BaseException:
        for d in created:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


@contextlib.contextmanager
def open_dest(dest, overwrite=False):
    """Yield write(relative_name, bytes) into a new zip (dest ends in .zip) or folder, committed only on success.

    Temporaries that an interrupted earlier write of `dest` left beside it are removed first."""
    _check_dest(dest, overwrite)
    _remove_stale_temporaries(dest)
    with _created_parents(dest):
        if dest.lower().endswith('.zip'):
            with atomic_write(dest, 'wb') as f, zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as zf:
                yield lambda name, data: zf.writestr(name, data)
            return
        parent = os.path.dirname(os.path.abspath(dest))
        tmp = tempfile.mkdtemp(dir=parent, prefix=temporary_prefix(dest), suffix='.tmp')
        try:
            def write(name, data):
                check_entry_name(name, dest)
                os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
                with open(os.path.join(tmp, name), 'wb') as f:
                    f.write(data)
            yield write
            os.chmod(tmp, 0o777 & ~_umask())            # mkdtemp makes it private; give it the usual mode
            if os.path.isdir(dest):                 # an empty folder, or --overwrite: swap, then delete the old one
                old = tempfile.mkdtemp(dir=parent, prefix=temporary_prefix(dest), suffix='.old')
                os.rename(dest, os.path.join(old, 'old'))
                os.rename(tmp, dest)
                shutil.rmtree(old)
            else:
                if os.path.lexists(dest):
                    os.remove(dest)
                os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _remove_stale_temporaries(dest):
    dest = os.path.normpath(dest)
    removed = remove_stale_temporaries(os.path.dirname(os.path.abspath(dest)), names=[os.path.basename(dest)])
    if removed:
        click.echo(f'Removed {len(removed)} temporary file(s) of an interrupted earlier write: {", ".join(removed)}')


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_dest(dest, overwrite):
    """Refuse an existing destination (other than an empty folder) unless --overwrite, and never change its kind."""
    if not os.path.lexists(dest):
        return
    is_dir = os.path.isdir(dest) and not os.path.islink(dest)
    if is_dir and not os.listdir(dest) and not dest.lower().endswith(('.zip', '.npz')):
        return
    if not overwrite:
        raise DatasetError(f'--dest={dest} already exists; remove it or pass --overwrite')
    if is_dir == dest.lower().endswith(('.zip', '.npz')):
        raise DatasetError(f'--dest={dest} exists as a {"folder" if is_dir else "file"}; refusing to replace it '
                           'with the other kind; remove it first')


def write_images(items, dest, overwrite=False, transform=None, resolution=None, colorize_seed=None, has_labels=False):
    """Load, process and write items as img%08d.png in EDM's layout (+ dataset.json with labels).

    Returns the shape (H, W, C) of the written images.
    """
    if not items:
        raise DatasetError('no images left to write: the source is empty or the filters removed everything')
    shape, labels = None, []
    with open_dest(dest, overwrite) as write:
        for idx, item in enumerate(tqdm(items, desc='Writing', unit='img', disable=None)):
            img = process_image(item, item.load(), transform, resolution, colorize_seed)
            if shape is None:
                shape = img.shape
                if shape[0] != shape[1]:
                    raise DatasetError(f'{item.name}: result is {shape[1]}x{shape[0]}, not square; use '
                                       '--transform=center-crop or a square --resolution')
            elif img.shape != shape:
                raise DatasetError(f'{item.name}: image is {img.shape[1]}x{img.shape[0]} with {img.shape[2]} channel(s), '
                                   f'but the first is {shape[1]}x{shape[0]} with {shape[2]}; use --resolution (and '
                                   '--transform) to make them uniform, or convert the source to one mode')
            name = f'{idx // 1000:05d}/img{idx:08d}.png'
            write(name, _encode_png(img))
            if has_labels:
                labels.append([name, int(item.label)])
        if has_labels:
            write(LABELS_FILE, json.dumps({'labels': labels}).encode('utf-8'))
    return shape


def write_toy(name, dest, num, dim, seed, overwrite=False):
    """Draw a toy source (data.toy) and write its arrays to an .npz atomically. Returns the arrays."""
    try:
        arrays = toy.make_toy(name, 10000 if num is None else num, seed, dim)
    except ValueError as e:
        raise DatasetError(f'--source=toy:{name}: {e}') from None
    _check_dest(dest, overwrite)
    _remove_stale_temporaries(dest)
    with _created_parents(dest), atomic_write(dest, 'wb') as f:
        np.savez(f, **arrays)
    return arrays

#----------------------------------------------------------------------------

def parse_resolution(text):
    """'WxH' -> (W, H), with W * H at most the pixels a training data set accepts (data.dataset.MAX_IMAGE_PIXELS)."""
    m = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text or '')
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise DatasetError(f'--resolution={text}: expected WIDTHxHEIGHT, e.g. 32x32')
    w, h = int(m.group(1)), int(m.group(2))
    if w * h > MAX_IMAGE_PIXELS:
        raise DatasetError(f'--resolution={text}: {w * h} pixels, over the bound of {MAX_IMAGE_PIXELS} (2^26, what '
                           'train.py reads)')
    return w, h


def parse_classes(text):
    """'2' or '2,3' -> [2, 3]."""
    try:
        out = [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        raise DatasetError(f'--classes={text}: expected a comma-separated list of ints, e.g. 2 or 2,3') from None
    if not out or min(out) < 0:
        raise DatasetError(f'--classes={text}: expected non-negative ints, e.g. 2 or 2,3')
    return out


def _check_option_use(opts, allowed, what):
    used = [f'--{k.replace("_", "-")}' for k, v in opts.items() if k not in allowed and v not in (None, False, 'all')]
    if used:
        raise DatasetError(f'{", ".join(used)} do(es) not apply to {what}')


def run(**opts):
    """Build the dataset described by the command's options (names as in the CLI, underscored)."""
    source, dest = opts['source'], opts['dest']
    common = {'source', 'dest', 'overwrite', 'seed'}
    if source.startswith('toy:'):
        _check_option_use(opts, common | {'num', 'dim'}, 'toy sources')
        if not dest.lower().endswith('.npz'):
            raise DatasetError(f'--dest={dest}: toy sources write vectors to an .npz file')
        arrays = write_toy(source[4:], dest, opts['num'], opts['dim'], opts['seed'], opts['overwrite'])
        click.echo(f'Wrote {arrays["x"].shape[0]} vectors of dimension {arrays["x"].shape[1]} '
                   f'({", ".join(arrays)}) to {dest}')
        return
    _check_option_use(opts, set(opts) - {'dim'}, 'image sources')
    if dest.lower().endswith('.npz'):
        raise DatasetError(f'--dest={dest}: an .npz holds vectors (--source=toy:NAME); write images to a .zip or folder')
    if _same_or_inside(source, dest):
        raise DatasetError(f'--dest={dest} would contain or replace --source={source}; choose another destination')
    if (opts['split_fraction'] is None) != (opts['split_part'] is None):
        raise DatasetError('--split-fraction and --split-part go together, e.g. --split-fraction=0.1 --split-part=test')
    if opts['split_fraction'] is not None and not 0 < opts['split_fraction'] < 1:
        raise DatasetError(f'--split-fraction={opts["split_fraction"]} must lie strictly between 0 and 1')
    if (opts['attr'] is None) != (opts['attr_value'] is None):
        raise DatasetError('--attr and --attr-value go together, e.g. --attr=Male --attr-value=1')
    if opts['transform'] is not None and opts['resolution'] is None:
        raise DatasetError(f'--transform={opts["transform"]} needs --resolution=WxH')

    resolution = parse_resolution(opts['resolution']) if opts['resolution'] is not None else None
    classes = parse_classes(opts['classes']) if opts['classes'] is not None else None
    render_res = resolution[0] if resolution is not None and resolution[0] == resolution[1] else 32
    src = open_source(source, opts['split'], classes, opts['num'], opts['seed'], render_res)
    items = select_items(src, classes, opts['attr'], None if opts['attr_value'] is None else int(opts['attr_value']),
                         opts['split_fraction'], opts['split_part'], opts['seed'], opts['max_images'])
    for note in src.notes:
        click.echo(f'Note: {note}')
    shape = write_images(items, dest, opts['overwrite'], opts['transform'], resolution,
                         opts['seed'] if opts['colorize'] else None, src.has_labels)
    click.echo(f'Wrote {len(items)} images {shape[1]}x{shape[0]} with {shape[2]} channel(s)'
               f'{" and labels" if src.has_labels else ""} to {dest}')


def _same_or_inside(source, dest):
    if not os.path.exists(source):
        return False
    s, d = os.path.realpath(source), os.path.realpath(dest)
    return s == d or s.startswith(d.rstrip(os.sep) + os.sep)

#----------------------------------------------------------------------------

HELP = f"""Build a dataset: images into a zip or folder (EDM layout: 00000/img00000000.png ..., plus
dataset.json when the source has labels), or toy vectors into an .npz.

\b
SOURCES (--source)
  DIR                    a folder of PNG/JPEG images, searched recursively (labels from its dataset.json)
  FILE.zip               a zip of PNG/JPEG images (labels from its dataset.json)
  DIR with MNIST files   train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
                         t10k-labels-idx1-ubyte (each raw or .gz): 28x28 grey digits with labels
  cifar-10-python.tar.gz the CIFAR-10 python tarball: 32x32 RGB images with labels
  DIR with CelebA files  list_attr_celeba.txt, img_align_celeba/, optional list_eval_partition.txt
  {SYNTHETIC}       digits drawn with Pillow's font, no download: 4000 train and 1000 test
                         images per class by default, 32x32 grey (or --resolution), with labels
  toy:NAME               toy vectors to an .npz (x, and labels / mean / cov where defined);
                         NAME is one of {", ".join(toy.SOURCES)}

\b
ORDER OF OPERATIONS
  own split (--split) -> --split-fraction/--split-part -> --classes -> --attr -> --max-images
  -> --transform / --resolution -> --colorize -> write

\b
EXAMPLES
  python dataset_tool.py --source={SYNTHETIC} --classes=2 --colorize --split=train --dest=datasets/2_train.zip
  python dataset_tool.py --source=downloads/mnist --classes=3 --split=test --resolution=32x32 --dest=datasets/mnist3_test.zip
  python dataset_tool.py --source=downloads/cifar-10-python.tar.gz --split=train --dest=datasets/cifar10-32x32.zip
  python dataset_tool.py --source=downloads/celeba --attr=Male --attr-value=-1 --split=train \\
      --transform=center-crop --resolution=64x64 --dest=datasets/celeba_female_64.zip
  python dataset_tool.py --source=toy:gaussian --dim=16 --num=10000 --seed=1 --dest=datasets/gauss16.npz
"""


@click.command(help=HELP)
@click.option('--source', required=True, metavar='PATH|synthetic-digits|toy:NAME', help='Input data (see SOURCES).')
@click.option('--dest', required=True, metavar='PATH', help='Output: a .zip or a folder for images, an .npz for toy vectors.')
@click.option('--max-images', type=click.IntRange(min=1), metavar='INT',
              help='Keep only the first INT images after the filters.')
@click.option('--transform', type=click.Choice(list(TRANSFORMS)),
              help='center-crop: crop the largest centred square; center-crop-wide: crop to W:H and pad to WxW. '
                   'Then resize to --resolution (required).')
@click.option('--resolution', metavar='WxH', help='Output size (W x H at most 2^26 pixels); without --transform the image is resized as is.')
@click.option('--classes', metavar='LIST', help='Keep only these labels, comma-separated, e.g. 2 or 2,3 (labelled sources).')
@click.option('--colorize', is_flag=True,
              help='Tint every image: grey image times a random saturated RGB colour (seeded by --seed and the '
                   'image\'s name within the source, wherever the source lies), as in Colored MNIST. Output is RGB.')
@click.option('--split', type=click.Choice(SPLITS), default='all', show_default=True,
              help="Choose the source's own split: MNIST, CIFAR-10, synthetic digits (train/test), CelebA with a "
                   'partition file (train/val/test).')
@click.option('--split-fraction', type=float, metavar='FLOAT',
              help='Seeded random split for any source: the test part is this fraction of the images.')
@click.option('--split-part', type=click.Choice(['train', 'test']), help='Which part of --split-fraction to write.')
@click.option('--attr', metavar='NAME', help='CelebA: keep images by this attribute, e.g. Male (with --attr-value).')
@click.option('--attr-value', type=click.Choice(['1', '-1']), help='CelebA: the value of --attr to keep.')
@click.option('--num', type=click.IntRange(min=1), metavar='INT',
              help=f'{SYNTHETIC}: images per class per split (default 4000 train, 1000 test; at most '
                   f'{MAX_DIGITS_PER_CLASS}); toy: number of vectors (default 10000; num x dim at most 2^27).')
@click.option('--dim', type=click.IntRange(min=1), metavar='INT',
              help=f'toy:{"/".join(toy.DIM_SOURCES)}: dimension (default 2, at most {toy.MAX_TOY_DIM}).')
@click.option('--seed', type=click.IntRange(min=0), default=0, show_default=True, metavar='INT',
              help='Seed of --colorize, --split-fraction, synthetic digits and toy sources.')
@click.option('--overwrite', is_flag=True, help='Replace an existing --dest.')
def main(**opts):
    try:
        problem = output_dir_problem(os.path.dirname(os.path.abspath(opts['dest'])))
        if problem is not None:
            raise DatasetError(f'--dest={opts["dest"]}: its folder cannot be written: {problem}; choose another --dest')
        run(**opts)
    except DatasetError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e: # Writing failed after all (a read-only filesystem, a full disk, a race): one line, no traceback.
        raise click.ClickException(f'--dest={opts["dest"]}: cannot write {e.filename or "there"} ({e.strerror or e})') from None


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
