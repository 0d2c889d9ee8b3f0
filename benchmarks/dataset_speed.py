"""Images/s of the zip ImageFolderDataset through a DataLoader, next to a plain decode-only loop.

Builds its own data (synthetic digits, data.digits) in a temporary folder, so it runs offline:

    python -m benchmarks.dataset_speed --num=4000 --workers=2

The decode-only loop reads each PNG from one open zip handle and decodes it with Pillow in this
process: the floor of what any loader must do. The DataLoader rows go through ImageFolderDataset
(lazy per-process zip handles, checks, one-hot labels, collation); their ratio to the decode-only loop
shows the overhead (workers 0) and the parallel speed-up (workers > 0, steady state = second epoch of
persistent workers; first epoch includes starting them).
"""

import io
import os
import tempfile
import time
import zipfile

import click
import numpy as np
import PIL.Image
import torch

import dataset_tool
from data.dataset import ImageFolderDataset


def build_zip(path, num, resolution):
    """Write `num` coloured synthetic digits (all classes) to a zip, as dataset_tool does."""
    source = dataset_tool.open_synthetic_digits('train', None, (num + 9) // 10, seed=0, resolution=resolution)
    items = source.items[:num]
    dataset_tool.write_images(items, path, colorize_seed=0, has_labels=True)


def decode_only(path):
    """Read and decode every PNG of the zip in this process; returns the number of images."""
    count = 0
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            if name.endswith('.png'):
                np.asarray(PIL.Image.open(io.BytesIO(zf.read(name))))
                count += 1
    return count


def loader_epochs(path, workers, batch, epochs):
    """Seconds per epoch of a DataLoader over ImageFolderDataset (persistent workers across epochs)."""
    ds = ImageFolderDataset(path, use_labels=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=False)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = sum(len(images) for images, _labels in loader)
        times.append(time.perf_counter() - t0)
        assert n == len(ds)
    return times, len(ds)


@click.command()
@click.option('--num', type=click.IntRange(min=10), default=4000, show_default=True, help='Images in the zip.')
@click.option('--resolution', type=click.IntRange(min=8), default=32, show_default=True, help='Image side.')
@click.option('--workers', type=click.IntRange(min=1), default=2, show_default=True, help='DataLoader worker processes.')
@click.option('--batch', type=click.IntRange(min=1), default=128, show_default=True, help='DataLoader batch size.')
def main(num, resolution, workers, batch):
    """Print images/s: decode-only loop vs ImageFolderDataset + DataLoader (0 and --workers workers)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'digits.zip')
        t0 = time.perf_counter()
        build_zip(path, num, resolution)
        print(f'Built {num} {resolution}x{resolution} RGB digits in {time.perf_counter() - t0:.1f} s '
              f'({os.path.getsize(path) / 2**20:.1f} MiB zip); {os.cpu_count()} CPUs')

        decode_only(path)                                            # warm the page cache
        t0 = time.perf_counter()
        count = decode_only(path)
        base = count / (time.perf_counter() - t0)
        print(f'{"decode-only loop":<38} {base:10.0f} img/s   1.00x')

        rows = [('DataLoader workers=0', 0, 2, -1)]
        rows += [(f'DataLoader workers={workers} (1st epoch)', workers, 2, 0),
                 (f'DataLoader workers={workers} (steady)', workers, 2, 1)]
        cache = {}
        for label, w, epochs, pick in rows:
            if w not in cache:
                cache[w] = loader_epochs(path, w, batch, epochs)
            times, n = cache[w]
            rate = n / times[pick]
            print(f'{label:<38} {rate:10.0f} img/s   {rate / base:.2f}x')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
