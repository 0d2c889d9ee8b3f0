"""Model space <-> uint8 images, and figures without plotting dependencies.

The one convention of the project: images live in model space as float32 in [-1, 1]
(`to_model_space`: u / 127.5 - 1), and go back to uint8 by round-half-up (`to_uint8`), the exact inverse
for uint8 data (EDM's convention). PNGs, figures, generated images and FID all use these two functions.
Figures (image grids, 2-D scatter plots) are drawn with Pillow.
"""

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

import dnnlib

#----------------------------------------------------------------------------
# Model space.

def to_model_space(items, device=None):
    """A collated batch as float32 in model space, on `device`: uint8 images -> [-1, 1] (u / 127.5 - 1),
    float vectors unchanged."""
    items = torch.as_tensor(items)
    if device is not None:
        items = items.to(device, non_blocking=True)
    if items.dtype == torch.uint8:
        return items.to(torch.float32) / 127.5 - 1
    return items.to(torch.float32)

def to_uint8(x):
    """Images in model space ([-1, 1]) -> uint8: floor(127.5 x + 128), clipped to [0, 255].

    Round-half-up of 127.5 (x + 1): the exact inverse of to_model_space for uint8 data (EDM's
    convention). Used for PNGs, figures and FID alike.
    """
    x = torch.as_tensor(x)
    return torch.floor(x.detach().to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------
# Figures.

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]

def image_grid(rows):
    """Stack rows of images (each a float tensor [N, C, H, W] in [-1, 1]) into one uint8 HWC array."""
    arrays = [to_uint8(r).cpu().numpy() for r in rows]
    n = max(a.shape[0] for a in arrays)
    c, h, w = arrays[0].shape[1:]
    grid = np.zeros([len(arrays) * h, n * w, c], dtype=np.uint8)
    for i, a in enumerate(arrays):
        for j in range(a.shape[0]):
            grid[i * h:(i + 1) * h, j * w:(j + 1) * w] = a[j].transpose(1, 2, 0)
    return grid[:, :, 0] if c == 1 else grid

def scatter_plot(point_sets, size=512, radius=1.5, margin=0.05):
    """Draw named 2-D point sets ({name: array [N, >=2]}, first two coordinates) with a legend; RGB uint8."""
    arrays = {k: np.asarray(v.detach().cpu() if torch.is_tensor(v) else v, dtype=np.float64)[:, :2] for k, v in point_sets.items()}
    allpts = np.concatenate(list(arrays.values()))
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    span = np.maximum(hi - lo, 1e-9).max()
    center = (lo + hi) / 2
    img = PIL.Image.new('RGB', (size, size), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(img)
    scale = size * (1 - 2 * margin) / span
    for k, (name, pts) in enumerate(arrays.items()):
        color = PALETTE[k % len(PALETTE)]
        px = (pts[:, 0] - center[0]) * scale + size / 2
        py = size / 2 - (pts[:, 1] - center[1]) * scale
        for x, y in zip(px, py):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
        draw.rectangle([8, 8 + 14 * k, 16, 16 + 14 * k], fill=color)
        draw.text((20, 6 + 14 * k), name, fill=(0, 0, 0))
    return np.asarray(img)

def save_png(array, path):
    """Write a uint8 HW or HWC array as a PNG, atomically."""
    with dnnlib.util.atomic_write(path, 'wb') as f:
        PIL.Image.fromarray(array).save(f, format='PNG')

def save_translation_figure(sets, path):
    """Source, outputs (and for vectors the target) of a translation, as one PNG.

    Images: one row per set except 'target' (source row, then one row per sampler). Vectors: a
    scatter plot of the first two coordinates of every set.
    """
    first = next(iter(sets.values()))
    if first.ndim == 4:
        save_png(image_grid([v for k, v in sets.items() if k != 'target']), path)
    else:
        save_png(scatter_plot(sets), path)
