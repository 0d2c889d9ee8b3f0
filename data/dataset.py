"""Datasets: images in a zip or folder (EDM layout and conventions) and vectors in a .npz.

Both give `__getitem__(idx) -> (item, label)` with a uint8 CHW image or a float32 vector, and a
one-hot float32 label of length `label_dim` (length 0 without labels).

Every problem with the data (unreadable file, corrupt or oversized image, inconsistent sizes, bad
labels, unsafe zip entry names, an .npz that is not a plain float32 array) raises `DatasetError`
naming the file. No data file is ever unpickled, and zip entries are never extracted to disk.
"""

import hashlib
import io
import json
import os
import warnings
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib

#----------------------------------------------------------------------------

class DatasetError(ValueError):
    """Bad or unusable data; the message names the file and the problem."""


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
IMAGE_FORMATS = ('PNG', 'JPEG')
MAX_IMAGE_PIXELS = 1 << 26      # refuse images that declare more pixels (decompression bombs)
MAX_FILE_BYTES = 1 << 28        # refuse zip entries / files larger than this (256 MiB)
LABELS_FILE = 'dataset.json'
_PNG_END = b'IEND\xaeB`\x82'  # the IEND chunk type and its CRC

# Pillow modes we accept, and the channel count each is converted to (see decode_image).
_GREY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N')
_COLOR_MODES = ('RGB', 'RGBA', 'RGBa', 'RGBX', 'P', 'PA', 'CMYK', 'YCbCr')


def mode_channels(mode, name='image'):
    """The number of channels (1 or 3) an image of Pillow mode `mode` decodes to."""
    if mode in _GREY_MODES:
        return 1
    if mode in _COLOR_MODES:
        return 3
    raise DatasetError(f'{name}: unsupported image mode {mode!r}; save it as 8-bit greyscale or RGB')


def _to_array(img, name):
    """Pixels of an opened Pillow image as uint8 HWC with C = mode_channels(img.mode).

    Conversions: alpha is dropped (not composited); palette, CMYK and YCbCr become RGB; '1' becomes
    0/255; 16-bit and 32-bit greyscale map v -> round(v / 257) after clipping to [0, 65535].
    """
    mode = img.mode
    channels = mode_channels(mode, name)
    if mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N'):
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        arr = ((wide + 128) // 257).astype(np.uint8)        # round(v / 257), exact in integers
    elif mode in ('1', 'LA', 'La'):
        arr = np.asarray(img.convert('L'))
    elif mode in ('P', 'PA', 'CMYK', 'YCbCr', 'RGBA', 'RGBa', 'RGBX'):
        # Pillow's convert('RGB') drops alpha for RGBA / PA; for RGBa it un-premultiplies first.
        arr = np.asarray(img.convert('RGB'))
    else:
        arr = np.asarray(img)
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    assert arr.dtype == np.uint8 and arr.shape[2] == channels, (mode, arr.dtype, arr.shape)
    return arr


def _open_image(data, name, max_pixels):
    """Open (header only) a PNG or JPEG from bytes; checks the declared size."""
    try:
        # Our own bound (below) replaces Pillow's decompression-bomb warning; other warnings pass through.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            img = PIL.Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        for w in caught:
            if not issubclass(w.category, PIL.Image.DecompressionBombWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except PIL.Image.DecompressionBombError:
        raise DatasetError(f'{name}: image declares more than {2 * PIL.Image.MAX_IMAGE_PIXELS} pixels, over the limit '
                           f'of {max_pixels} (a decompression bomb; if it is genuine, raise both max_pixels and '
                           'PIL.Image.MAX_IMAGE_PIXELS)') from None
    except PIL.UnidentifiedImageError:
        if data[:8] == b'\x89PNG\r\n\x1a\n' or data[:2] == b'\xff\xd8':
            raise DatasetError(f'{name}: corrupt or truncated image (its header cannot be read)') from None
        raise DatasetError(f'{name}: not a PNG or JPEG image (remove it, or convert it to PNG)') from None
    except Exception as e:  # Pillow raises many types on corrupt headers
        raise DatasetError(f'{name}: corrupt or truncated image header ({type(e).__name__}: {e})') from e
    width, height = img.size
    if width < 1 or height < 1:
        raise DatasetError(f'{name}: image has an empty size {width}x{height}')
    if width * height > max_pixels:
        raise DatasetError(f'{name}: image declares {width}x{height} = {width * height} pixels, over the limit of '
                           f'{max_pixels} (a decompression bomb, or raise max_pixels if it is genuine)')
    return img


def image_header(data, name, max_pixels=MAX_IMAGE_PIXELS):
    """(width, height, channels) of a PNG or JPEG, from its header alone."""
    img = _open_image(data, name, max_pixels)
    return img.size[0], img.size[1], mode_channels(img.mode, name)


def decode_image(data, name, max_pixels=MAX_IMAGE_PIXELS):
    """Decode PNG or JPEG bytes into a uint8 HWC array with 1 (grey) or 3 (colour) channels.

    Args:
        data: the file's bytes.
        name: file name for error messages.
        max_pixels: refuse images whose header declares more pixels than this.
    Returns:
        uint8 [H, W, C], C in {1, 3}. See _to_array for the mode conversions.
    """
    img = _open_image(data, name, max_pixels)
    if img.format == 'PNG' and data.rfind(_PNG_END) < 0:
        # Pillow decodes a PNG cut inside its last chunk without complaint; the end marker tells.
        raise DatasetError(f'{name}: corrupt or truncated image (the PNG end chunk is missing)')
    try:
        with img:
            img.load()
            return _to_array(img, name)
    except DatasetError:
        raise
    except Exception as e:  # truncated / corrupt data: OSError, SyntaxError, ValueError, struct.error, ...
        raise DatasetError(f'{name}: corrupt or truncated image ({type(e).__name__}: {e})') from e

#----------------------------------------------------------------------------
# Raw files of a zip or a folder.

def check_entry_name(name, container):
    """Raise DatasetError unless `name` is a safe relative path ('/'-separated, no '..', not absolute)."""
    if '\0' in name:
        raise DatasetError(f'{container}: entry name {name!r} contains a NUL character')
    parts = name.replace('\\', '/').split('/')
    if name.startswith(('/', '\\')) or (len(parts[0]) >= 2 and parts[0][1] == ':'):
        raise DatasetError(f'{container}: entry {name!r} has an absolute path; rebuild the archive with relative names')
    if '..' in parts:
        raise DatasetError(f'{container}: entry {name!r} points outside the archive ("..")')


def _is_hidden(name):
    parts = name.split('/')
    return parts[0] == '__MACOSX' or any(p.startswith('.') for p in parts if p)


class RawFiles:
    """The files of a zip archive or a folder (recursive), read by relative '/'-separated name.

    Zip entries are read straight from the archive; each process opens its own handle (on first use,
    keyed on the process id), so the object pickles cleanly into DataLoader workers. Hidden files
    (any path part starting with '.') and macOS '__MACOSX/' entries are ignored.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._zip = None
        self._zip_pid = None
        self.skipped_links = [] # Symlinked subfolders of a folder: listed here, not followed (they may loop).
        if os.path.isdir(self.path):
            self.kind = 'dir'
            self.names = sorted(self._list_dir())
        elif os.path.isfile(self.path):
            self.kind = 'zip'
            self.names = sorted(self._list_zip())
        else:
            raise DatasetError(f'{self.path}: no such file or directory; expected a .zip or a folder of images')

    def _list_dir(self):
        names = []
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            rel_root = os.path.relpath(root, self.path)
            links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            self.skipped_links += [(d if rel_root == '.' else os.path.join(rel_root, d)).replace(os.sep, '/')
                                   for d in links]
            for f in files:
                rel = f if rel_root == '.' else os.path.join(rel_root, f)
                rel = rel.replace(os.sep, '/')
                if not _is_hidden(rel):
                    names.append(rel)
        return names

    def _list_zip(self):
        infos = self._zipfile().infolist()
        names, seen = [], set()
        for info in infos:
            check_entry_name(info.filename, self.path)
            if info.is_dir() or _is_hidden(info.filename):
                continue
            if info.filename in seen:
                raise DatasetError(f'{self.path}: entry {info.filename!r} appears twice; rebuild the archive')
            if info.file_size > MAX_FILE_BYTES:
                raise DatasetError(f'{self.path}: entry {info.filename!r} declares {info.file_size} bytes, over the '
                                   f'limit of {MAX_FILE_BYTES}')
            seen.add(info.filename)
            names.append(info.filename)
        return names

    def _zipfile(self):
        if self._zip is None or self._zip_pid != os.getpid():
            # A handle inherited through fork shares its file offset with the parent: never reuse it.
            try:
                self._zip = zipfile.ZipFile(self.path)
            except Exception as e:  # BadZipFile, OSError, EOFError, UnicodeDecodeError (bad UTF-8 names), ...
                raise DatasetError(f'{self.path}: not a readable zip archive ({type(e).__name__}: {e}); '
                                   'rebuild it, e.g. with dataset_tool.py') from e
            self._zip_pid = os.getpid()
        return self._zip

    def read(self, name):
        """The bytes of file `name`."""
        label = f'{self.path}:{name}' if self.kind == 'zip' else os.path.join(self.path, name)
        try:
            if self.kind == 'zip':
                with self._zipfile().open(name) as f:
                    return f.read()
            with open(os.path.join(self.path, name), 'rb') as f:
                data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise DatasetError(f'{label}: file is larger than the limit of {MAX_FILE_BYTES} bytes')
            return data
        except DatasetError:
            raise
        except KeyError:
            raise DatasetError(f'{label}: no such entry') from None
        except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError, RuntimeError (encrypted), OSError
            raise DatasetError(f'{label}: cannot read file ({type(e).__name__}: {e})') from e

    def describe(self, name):
        """The file's name as shown in error messages."""
        return f'{self.path}:{name}' if self.kind == 'zip' else os.path.join(self.path, name)

    def close(self):
        if self._zip is not None:
            self._zip.close()
        self._zip = None

    def __getstate__(self):
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def image_names(raw):
    """The image files of a RawFiles object, sorted, and the other (non-image) files."""
    images = [n for n in raw.names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    others = [n for n in raw.names if os.path.splitext(n)[1].lower() not in IMAGE_EXTENSIONS and n != LABELS_FILE]
    return images, others


def parse_labels(data, source, image_list):
    """Parse dataset.json bytes into int labels aligned with `image_list`, or None for {"labels": null}.

    The file must be {"labels": [["relative/name.png", int], ...]} listing every image exactly once.
    """
    try:
        obj = json.loads(data.decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f'{source}: not valid UTF-8 JSON ({e})') from None
    if not isinstance(obj, dict) or 'labels' not in obj:
        raise DatasetError(f'{source}: expected a JSON object with a "labels" key, got {type(obj).__name__}')
    labels = obj['labels']
    if labels is None:
        return None
    if not isinstance(labels, list):
        raise DatasetError(f'{source}: "labels" must be a list of [name, int] pairs or null, got {type(labels).__name__}')
    table = {}
    for k, entry in enumerate(labels):
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        ok = ok and isinstance(entry[1], int) and not isinstance(entry[1], bool) and 0 <= entry[1] < 2**31
        if not ok:
            raise DatasetError(f'{source}: labels[{k}] = {str(entry)[:80]} is not a [name, non-negative int] pair')
        name = entry[0].replace('\\', '/')
        if name in table:
            raise DatasetError(f'{source}: {name!r} is labelled twice')
        table[name] = entry[1]
    missing = [n for n in image_list if n not in table]
    if missing:
        raise DatasetError(f'{source}: {len(missing)} images have no label, e.g. {missing[0]!r}; '
                           'list every image in "labels"')
    extra = sorted(set(table) - set(image_list))
    if extra:
        raise DatasetError(f'{source}: {len(extra)} labels name files that are not images of the dataset, '
                           f'e.g. {extra[0]!r}; remove them from "labels"')
    return np.array([table[n] for n in image_list], dtype=np.int64)


def _hash_files(items):
    """sha256 over (name, bytes) pairs: each contributes utf8(name) + NUL + 8-byte little-endian length + bytes."""
    h = hashlib.sha256()
    for name, data in items:
        h.update(os.fsencode(name) + b'\0')
        h.update(len(data).to_bytes(8, 'little'))
        h.update(data)
    return h.hexdigest()

def _with_progress(items, what, total=None):
    """Yield `items`, showing '<what>: i/total files' on one progress line (nothing for quick work)."""
    line = dnnlib.util.ProgressLine()
    for count, item in enumerate(items, 1):
        line.update(f'{what}: {count}{"" if total is None else f"/{total}"} files')
        yield item
    line.clear()

#----------------------------------------------------------------------------

class Dataset(torch.utils.data.Dataset):
    """Common base: a deterministic subset of the raw items, optional x-flips, one-hot labels.

    Args:
        name: short name of the dataset.
        raw_size: number of raw items.
        max_size: keep at most this many raw items: a random subset (seeded by random_seed), in
            original order. None keeps all.
        use_labels: give labels (when the data has any) instead of empty label vectors.
        xflip: double the dataset with horizontally mirrored copies (images only).
        random_seed: seed of the max_size subset.
    """

    def __init__(self, name, raw_size, max_size=None, use_labels=False, xflip=False, random_seed=0):
        self._name = name
        self._raw_size = int(raw_size)
        self._use_labels = bool(use_labels)
        self._max_size = max_size
        self._random_seed = int(random_seed)
        self._raw_labels = None
        self._hash = None
        if max_size is not None and (not isinstance(max_size, (int, np.integer)) or max_size < 1):
            raise DatasetError(f'{name}: max_size must be a positive int or None, got {max_size!r}')
        self._raw_idx = np.arange(self._raw_size, dtype=np.int64)
        if max_size is not None and self._raw_size > max_size:
            keep = np.random.default_rng(self._random_seed).permutation(self._raw_size)[:max_size]
            self._raw_idx = np.sort(keep)
        self._xflip = np.zeros(len(self._raw_idx), dtype=np.uint8)
        if xflip:
            self._raw_idx = np.concatenate([self._raw_idx, self._raw_idx])
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    # Subclasses implement these two.
    def _load_raw_labels(self):
        """int64 [raw_size] labels, or None."""
        return None

    def _raw_hash_items(self):
        """(name, bytes) pairs of the raw files, in sorted name order."""
        raise NotImplementedError

    def _get_raw_labels(self):
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            self._raw_labels = np.zeros([self._raw_size, 0], dtype=np.float32) if labels is None else labels
        return self._raw_labels

    @property
    def name(self):
        return self._name

    @property
    def max_size(self):
        return self._max_size

    @property
    def random_seed(self):
        return self._random_seed

    @property
    def xflip(self):
        return bool(self._xflip.any())

    @property
    def label_dim(self):
        labels = self._get_raw_labels()
        if labels.ndim == 2:
            return 0
        return int(labels.max()) + 1 if len(labels) else 0

    @property
    def label_shape(self):
        return [self.label_dim]

    @property
    def has_labels(self):
        return self.label_dim > 0

    def get_label(self, idx):
        """One-hot float32 label [label_dim] of item idx (a vector of length 0 without labels)."""
        labels = self._get_raw_labels()
        onehot = np.zeros([self.label_dim], dtype=np.float32)
        if labels.ndim == 1:
            onehot[labels[self._raw_idx[idx]]] = 1
        return onehot

    def data_hash(self, progress=False):
        """sha256 hex digest of the raw files (see _hash_files), for provenance. `progress`: show how far it got
        on one line (dnnlib.util.ProgressLine) when it takes more than a second."""
        if self._hash is None:
            items = self._raw_hash_items()
            if progress:
                items = _with_progress(items, f'Hashing {self._name}')
            self._hash = _hash_files(items)
        return self._hash

    def __len__(self):
        return len(self._raw_idx)

    def _check_index(self, idx):
        if not -len(self) <= idx < len(self):
            raise IndexError(f'{self._name}: index {idx} out of range for {len(self)} items')
        return idx % len(self)

#----------------------------------------------------------------------------

class ImageFolderDataset(Dataset):
    """Images from a zip or a folder (recursive), EDM conventions.

    All images must be square and share one resolution and channel count (1 grey or 3 colour);
    labels come from an optional `dataset.json` at the root: {"labels": [["name.png", int], ...]}.

    Args:
        path: the .zip or folder.
        resolution: if given, require this resolution.
        cache: keep decoded images in memory (per process) after first use.
        check_all: read every image header at start-up to check sizes; if False, only the first
            image is checked up front and the others when they are loaded.
        progress: show the header check's progress on one line when it takes more than a second.
        max_pixels: refuse images declaring more pixels than this.
        **kwargs: max_size, use_labels, xflip, random_seed (see Dataset), name (default: file stem).
    """

    def __init__(self, path, resolution=None, cache=False, check_all=True, max_pixels=MAX_IMAGE_PIXELS,
                 name=None, progress=False, **kwargs):
        self._path = os.fspath(path)
        self._raw = RawFiles(self._path)
        self._image_names, self.ignored_files = image_names(self._raw)
        self._cache = bool(cache)
        self._cached = {}
        self._max_pixels = int(max_pixels)
        if not self._image_names:
            raise DatasetError(f'{self._path}: no PNG or JPEG images found ({len(self._raw.names)} other files)')
        if name is None:
            name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        super().__init__(name=name, raw_size=len(self._image_names), **kwargs)

        check = np.unique(self._raw_idx) if check_all else self._raw_idx[:1]
        first = self._image_names[check[0]]
        w, h, c = image_header(self._raw.read(first), self._raw.describe(first), self._max_pixels)
        if w != h:
            raise DatasetError(f'{self._raw.describe(first)}: image is {w}x{h}, not square; '
                               'crop it, e.g. dataset_tool.py --transform=center-crop')
        if resolution is not None and w != resolution:
            raise DatasetError(f'{self._path}: images are {w}x{h}, but resolution={resolution} was requested')
        self._image_shape = [c, h, w]
        for i in (_with_progress(check[1:], f'Checking {self._path}', len(check) - 1) if progress else check[1:]):
            n = self._image_names[i]
            self._check_shape(image_header(self._raw.read(n), self._raw.describe(n), self._max_pixels), n)

    def _check_shape(self, header, name):
        w, h, c = header
        if [c, h, w] != self._image_shape:
            c0, h0, w0 = self._image_shape
            raise DatasetError(f'{self._raw.describe(name)}: image is {w}x{h} with {c} channel(s), but '
                               f'{self._image_names[self._raw_idx[0]]} is {w0}x{h0} with {c0}; all images must '
                               'share one size and channel count (rebuild with dataset_tool.py --resolution)')

    def verify(self, progress=None):
        """Decode every image of the data set once (without caching) to find corrupt or truncated files now rather
        than mid-training. `progress(done, total)` is called after each image. Raises DatasetError naming the file."""
        indices = np.unique(self._raw_idx)
        for k, raw_idx in enumerate(indices):
            name = self._image_names[raw_idx]
            image = decode_image(self._raw.read(name), self._raw.describe(name), self._max_pixels)
            self._check_shape((image.shape[1], image.shape[0], image.shape[2]), name)
            if progress is not None:
                progress(k + 1, len(indices))

    @property
    def path(self):
        return self._path

    @property
    def skipped_links(self):
        """Symlinked subfolders of a folder data set, which are not followed."""
        return list(self._raw.skipped_links)

    @property
    def image_shape(self):
        return list(self._image_shape)

    @property
    def item_shape(self):
        """[C, H, W], the shape of one item (as VectorDataset.item_shape is [D])."""
        return list(self._image_shape)

    @property
    def num_channels(self):
        return self._image_shape[0]

    @property
    def resolution(self):
        return self._image_shape[1]

    def _load_raw_image(self, raw_idx):
        name = self._image_names[raw_idx]
        image = self._cached.get(raw_idx)
        if image is None:
            image = decode_image(self._raw.read(name), self._raw.describe(name), self._max_pixels)
            self._check_shape((image.shape[1], image.shape[0], image.shape[2]), name)
            image = np.ascontiguousarray(image.transpose(2, 0, 1))  # HWC => CHW
            if self._cache:
                self._cached[raw_idx] = image
        return image

    def _load_raw_labels(self):
        if LABELS_FILE not in self._raw.names:
            return None
        return parse_labels(self._raw.read(LABELS_FILE), self._raw.describe(LABELS_FILE), self._image_names)

    def _raw_hash_items(self):
        names = sorted(self._image_names + ([LABELS_FILE] if LABELS_FILE in self._raw.names else []))
        return ((n, self._raw.read(n)) for n in names)

    def __getitem__(self, idx):
        idx = self._check_index(idx)
        image = self._load_raw_image(self._raw_idx[idx])
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def close(self):
        self._raw.close()

#----------------------------------------------------------------------------

class VectorDataset(Dataset):
    """Vectors from a .npz holding a float32 array `x` [N, D] (optionally int `labels` [N]).

    Other arrays of the file (e.g. `mean`, `cov` of a Gaussian) are available in `extra_arrays`.
    The file is read with allow_pickle=False: object arrays are refused.

    Args:
        path: the .npz file.
        **kwargs: max_size, use_labels, random_seed (see Dataset), name (default: file stem).
    """

    def __init__(self, path, name=None, **kwargs):
        self._path = os.fspath(path)
        if kwargs.get('xflip'):
            raise DatasetError(f'{self._path}: xflip applies to images only, not to vectors')
        arrays = load_npz(self._path)
        x = arrays.pop('x', None)
        if x is None:
            raise DatasetError(f'{self._path}: no array named "x" (found: {", ".join(sorted(arrays)) or "none"}); '
                               'save the data with np.savez(path, x=data)')
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise DatasetError(f'{self._path}: "x" must be a float32 array [N, D] with N, D >= 1, got {x.dtype} '
                               f'{list(x.shape)}; save np.asarray(x, dtype=np.float32).reshape(N, -1)')
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DatasetError(f'{self._path}: "x" holds {bad} non-finite values (NaN or inf)')
        labels = arrays.pop('labels', None)
        if labels is not None:
            if labels.dtype.kind not in 'iu' or labels.shape != (x.shape[0],) or (len(labels) and labels.min() < 0):
                raise DatasetError(f'{self._path}: "labels" must be non-negative ints of shape [{x.shape[0]}], got '
                                   f'{labels.dtype} {list(labels.shape)}')
            labels = labels.astype(np.int64)
        self._x = x
        self._labels = labels
        self.extra_arrays = arrays
        if name is None:
            name = os.path.splitext(os.path.basename(self._path))[0]
        super().__init__(name=name, raw_size=len(x), **{k: v for k, v in kwargs.items() if k != 'xflip'})

    @property
    def path(self):
        return self._path

    @property
    def dim(self):
        return self._x.shape[1]

    @property
    def item_shape(self):
        return [self.dim]

    def _load_raw_labels(self):
        return self._labels

    def _raw_hash_items(self):
        raw = RawFiles(self._path)
        try:
            return [(n, raw.read(n)) for n in raw.names]
        finally:
            raw.close()

    def __getitem__(self, idx):
        idx = self._check_index(idx)
        return self._x[self._raw_idx[idx]].copy(), self.get_label(idx)


def load_npz(path):
    """All arrays of an .npz file as a dict, loaded with allow_pickle=False; DatasetError on any problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f'{path}: no such file; expected an .npz holding a float32 array "x" [N, D]')
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DatasetError(f'{path}: a single .npy array, not an .npz archive; save with np.savez(path, x=data)')
        with npz:
            out = {}
            for key in npz.files:
                check_entry_name(key, path)
                out[key] = npz[key]
            return out
    except DatasetError:
        raise
    except ValueError as e:
        if 'pickle' in str(e).lower():
            raise DatasetError(f'{path}: holds pickled (object) data, which is never loaded; store plain numeric '
                               'arrays only') from None
        raise DatasetError(f'{path}: cannot read .npz ({e})') from e
    except Exception as e:  # BadZipFile, EOFError, OSError, zlib.error, ...
        raise DatasetError(f'{path}: cannot read .npz ({type(e).__name__}: {e})') from e

#----------------------------------------------------------------------------

def open_dataset(path, **kwargs):
    """ImageFolderDataset or VectorDataset, chosen by the path: `.npz` -> vectors, else images."""
    if os.fspath(path).lower().endswith('.npz'):
        return VectorDataset(path, **kwargs)
    return ImageFolderDataset(path, **kwargs)

#----------------------------------------------------------------------------
