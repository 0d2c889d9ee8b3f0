"""Image sets stored as one array in an .npz: the ADM-style sample batches (`arr_0`, uint8 [N, H, W, C]) that
generate.py --npz writes and the evaluators of ADM and DPM-OT read, and ADM's reference batches.

The array's header (dtype and shape) is read from the archive before anything is loaded, and an array that
would need more than `MAX_BYTES` is refused: a file cannot make fid.py allocate what it likes.
"""

import os
import zipfile

import numpy as np
import torch

MAX_BYTES = 2**34   # 16 GiB: 50 000 images of 256 x 256 x 3 take 9.8 GB

#----------------------------------------------------------------------------

class NpzImagesError(ValueError):
    """An .npz that holds no usable image batch; the message says what is wrong and what to pass instead."""


def read_npy_header(path, key):
    """(shape, dtype) of array `key` of the .npz `path`, from its header alone; NpzImagesError if it is missing."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith('.npy')]
            if key not in names:
                raise NpzImagesError(f'"{path}" holds no array "{key}" (it holds {", ".join(names) or "none"}); an '
                                     'image batch keeps its images in arr_0 (generate.py --npz, ADM\'s evaluator)')
            with zf.open(f'{key}.npy') as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        if isinstance(err, NpzImagesError):
            raise
        raise NpzImagesError(f'"{path}" is not a readable .npz ({type(err).__name__}: {err})') from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


class NpzImages(torch.utils.data.Dataset):
    """The images of an ADM-style batch as a data set: item i is uint8 [C, H, W] (as ImageFolderDataset's).

    Args:
        path: the .npz file.
        key: the array (arr_0).
        max_bytes: refuse arrays larger than this (checked from the header, before loading).
    """

    def __init__(self, path, key='arr_0', max_bytes=MAX_BYTES):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise NpzImagesError(f'no such file: "{self.path}"')
        shape, dtype = read_npy_header(self.path, key)
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or shape[0] < 1:
            raise NpzImagesError(f'"{self.path}": {key} is {dtype} {list(shape)}; an image batch is uint8 [N, H, W, C] '
                                 'with C = 1 or 3 and N >= 1 (generate.py --npz writes one)')
        size = int(np.prod(shape, dtype=np.int64))
        if size > max_bytes:
            raise NpzImagesError(f'"{self.path}": {key} of shape {list(shape)} needs {size / 2**30:.1f} GiB, more than '
                                 f'the {max_bytes / 2**30:.0f} GiB an image batch may take here; write the images as '
                                 'PNGs (generate.py --outdir) and pass the folder')
        with np.load(self.path, allow_pickle=False) as data:
            self.images = data[key]
        self.image_shape = [shape[3], shape[1], shape[2]]

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, idx):
        return np.ascontiguousarray(self.images[idx].transpose(2, 0, 1))

#----------------------------------------------------------------------------
