"""Synthetic handwritten-style digits drawn with Pillow's built-in scalable font (no download needed).

Each digit is the glyph of Pillow's embedded default FreeType font (Aileron Regular), drawn large,
then warped by a random affine map (size, aspect, rotation, shear, position) and a smooth random
elastic field (the wobble of a hand-drawn stroke), with a random stroke width and ink level, and
box-downsampled to the output resolution. Images are white-ish ink on black, like MNIST.

Every image has its own numpy Generator, so an image depends only on its seed, never on how many
images are drawn with it or in which order.
"""

import functools

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import scipy.ndimage

SUPERSAMPLE = 4             # draw at 4x the output resolution, then box-filter down
_MAX_ROTATION_DEG = 14.0
_MAX_SHEAR = 0.28
_ELASTIC_GRID = 5           # control points per side of the elastic field
_ELASTIC_AMPLITUDE = 0.07   # std of a control-point displacement, as a fraction of the image side

#----------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _font(size):
    return PIL.ImageFont.load_default(size=size)


def _draw_glyph(label, size, rng):
    """The upright glyph on a black square canvas of side `size`, as float32 in [0, 1]."""
    font = _font(int(round(rng.uniform(0.62, 0.82) * size)))
    stroke = int(round(rng.uniform(0.0, 0.028) * size))
    ink = int(round(255 * rng.uniform(0.75, 1.0)))
    canvas = PIL.Image.new('L', (size, size), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    draw.text((size / 2, size / 2), str(int(label)), fill=ink, font=font, anchor='mm',
              stroke_width=stroke, stroke_fill=ink)
    return np.asarray(canvas, dtype=np.float32) / 255


@functools.lru_cache(maxsize=16)
def _grid(size):
    """Centred pixel coordinates [2, size, size] (row, col) and the elastic basis [size, grid]."""
    c = (size - 1) / 2
    coords = np.stack(np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing='ij'))
    # Gaussian bumps centred on a coarse grid, rows normalised to sum to one: a smooth interpolant
    # of the coarse control values.
    centres = (np.arange(_ELASTIC_GRID) + 0.5) * size / _ELASTIC_GRID
    basis = np.exp(-0.5 * ((np.arange(size)[:, None] + 0.5 - centres[None, :]) / (0.8 * size / _ELASTIC_GRID)) ** 2)
    basis /= basis.sum(axis=1, keepdims=True)
    return coords, basis


def _warp_coordinates(size, rng):
    """Source coordinates [2, size, size] (row, col) of a random affine + elastic warp."""
    angle = np.deg2rad(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    shear = rng.uniform(-_MAX_SHEAR, _MAX_SHEAR)
    scale = rng.uniform(0.88, 1.1) * np.array([rng.uniform(0.9, 1.1), 1.0])  # (rows, cols)
    shift = rng.uniform(-0.05, 0.05, size=2) * size
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rot @ np.array([[1.0, 0.0], [shear, 1.0]]) @ np.diag(scale)  # glyph -> image, (row, col)
    coords, basis = _grid(size)
    # Output pixel p came from glyph pixel forward^-1 (p - shift), plus a smooth elastic offset.
    src = np.einsum('ij,jhw->ihw', np.linalg.inv(forward), coords - shift[:, None, None]) + (size - 1) / 2
    coarse = rng.normal(size=(2, _ELASTIC_GRID, _ELASTIC_GRID)) * (_ELASTIC_AMPLITUDE * size)
    return src + basis @ coarse @ basis.T


def render_digit(label, rng, resolution=32):
    """Draw one digit.

    Args:
        label: the digit, 0..9.
        rng: a numpy Generator; all randomness of this image comes from it.
        resolution: output side in pixels.
    Returns:
        uint8 array [resolution, resolution], ink bright on black.
    """
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f'render_digit: label must be a digit 0..9, got {label}')
    if int(resolution) < 8:
        raise ValueError(f'render_digit: resolution must be at least 8 pixels, got {resolution}')
    size = int(resolution) * SUPERSAMPLE
    glyph = _draw_glyph(label, size, rng)
    warped = scipy.ndimage.map_coordinates(glyph, _warp_coordinates(size, rng), order=1, mode='constant', cval=0.0)
    small = warped.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))
    return np.clip(np.rint(small * 255), 0, 255).astype(np.uint8)


def digit_rng(*seed):
    """The Generator of one image, from a tuple of non-negative ints (e.g. seed, split, class, index)."""
    return np.random.default_rng([int(s) for s in seed])


def render_digits(labels, seed, resolution=32):
    """Draw a batch of digits; image k uses digit_rng(seed, k), so it depends only on (seed, k, label).

    Args:
        labels: sequence of ints 0..9, one per image.
        seed: non-negative int.
        resolution: output side in pixels.
    Returns:
        uint8 array [N, resolution, resolution].
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    out = np.zeros([len(labels), int(resolution), int(resolution)], dtype=np.uint8)
    for k, label in enumerate(labels):
        out[k] = render_digit(label, digit_rng(seed, k), resolution)
    return out


def hue_colors(hues):
    """Fully saturated, full-value RGB colours for hues in [0, 1): float32 [N, 3] in [0, 1]."""
    h = (np.asarray(hues, dtype=np.float64) % 1.0)[:, None] * 6
    k = (np.array([5.0, 3.0, 1.0]) + h) % 6                      # the standard HSV -> RGB formula, s = v = 1
    return (1 - np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def colorize(grey, color):
    """Tint a grey image: out = grey * color (Colored MNIST as in the EOT papers).

    Args:
        grey: uint8 [H, W].
        color: three floats in [0, 1].
    Returns:
        uint8 [H, W, 3].
    """
    color = np.asarray(color, dtype=np.float32).reshape(1, 1, 3)
    return np.clip(np.rint(grey.astype(np.float32)[:, :, None] * color), 0, 255).astype(np.uint8)

#----------------------------------------------------------------------------
