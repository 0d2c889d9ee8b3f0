"""Feature detectors for FID and precision/recall.

The real detector is the standard Inception-v3 feature network of FID: a TorchScript translation of
TensorFlow's `inception-2015-12-05` graph, distributed as a pickle by StyleGAN3 / EDM. It is called on
uint8 NCHW RGB images of any resolution (it resizes them to 299x299 itself) with
`return_features=True` and returns the 2048-d pool features.

Tests never download it: `StandInDetector` is a small conv net with fixed random weights drawn from a
seed, with the same call convention, selected by the spec string 'standin:SEED'. Its numbers are not FID.
"""

import hashlib
import os
import pickle
import re
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist_utils

#----------------------------------------------------------------------------

DEFAULT_DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
# sha256 of the file at DEFAULT_DETECTOR_URL (95 617 399 bytes), as recorded publicly beside edm's sources; the
# cached download is checked against it before it is unpickled (docs/safe-loading.md).
DEFAULT_DETECTOR_SHA256 = 'a31bd1d4522101109044ec28621a5fcb591ed6115e0d58104fc013fa01ef94f7'
DETECTOR_ENV = 'EOT_FID_DETECTOR'
FEATURE_DIM = 2048
INCEPTION_RESOLUTION = 299 # What the real detector sees; it resizes internally.


class DetectorUnavailable(RuntimeError):
    """The feature detector could not be loaded (offline with no cached copy, or a missing file).

    The message names the location that failed and how to provide a local copy. A training loop can
    catch this, print one line and go on training without FID.
    """

#----------------------------------------------------------------------------

class StandInDetector(torch.nn.Module):
    """A fixed random conv net with the Inception detector's call convention; for tests only.

    Its weights are a pure function of `seed` (drawn on the CPU, so every device gets the same net).
    It resizes uint8 NCHW RGB images to `resolution` x `resolution`, scales them to [-1, 1], runs three
    stride-2 3x3 conv + ReLU layers and average-pools the last one to 4x4, giving 128 * 16 = 2048
    non-negative features. Its numbers are NOT FID: they only exercise the plumbing.
    """

    def __init__(self, seed=0, resolution=64, num_classes=1008):
        super().__init__()
        self.seed = int(seed)
        self.resolution = int(resolution)
        g = torch.Generator().manual_seed(self.seed)
        channels = [3, 32, 64, 128]
        self.convs = torch.nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            conv = torch.nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * np.sqrt(2 / (c_in * 9)))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            self.convs.append(conv)
        self.pool_size = 4
        self.feature_dim = channels[-1] * self.pool_size ** 2
        self.head = torch.nn.Linear(self.feature_dim, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) / np.sqrt(self.feature_dim))
            self.head.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, x, return_features: bool = False, no_output_bias: bool = False):
        """uint8 [N, 3, H, W] -> float32 features [N, 2048] (return_features=True) or class probabilities
        [N, num_classes] (softmax of the head's logits, without its bias when no_output_bias)."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f'StandInDetector expects uint8 [N, 3, H, W] images, got {x.dtype} {list(x.shape)}')
        x = x.to(torch.float32) / 127.5 - 1
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            x = torch.nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode='bilinear', align_corners=False)
        for conv in self.convs:
            x = torch.relu(conv(x))
        features = torch.nn.functional.adaptive_avg_pool2d(x, self.pool_size).flatten(1)
        if return_features:
            return features
        logits = features @ self.head.weight.T
        if not no_output_bias:
            logits = logits + self.head.bias
        return torch.softmax(logits, dim=1)

#----------------------------------------------------------------------------

class Detector:
    """A loaded feature network with the FID call convention, wrapped for convenience.

    `detector(images)` takes uint8 [N, C, H, W] images with C = 1 or 3 (1-channel images are repeated
    to 3 channels), on any device, and returns float32 features [N, feature_dim] on `detector.device`.
    Attributes: `net` (the network), `name` (what was loaded), `is_standin`, `feature_dim`, `device`.
    """

    def __init__(self, net, name, device, is_standin=False, feature_dim=FEATURE_DIM):
        self.net = net
        self.name = str(name)
        self.device = torch.device(device)
        self.is_standin = bool(is_standin)
        self.feature_dim = int(feature_dim)

    def _prepare(self, images):
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8:
            raise TypeError(f'The detector expects uint8 images, got {images.dtype}; convert images in [-1, 1] '
                            f'with torch_utils.images.to_uint8()')
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'The detector expects [N, C, H, W] images with C = 1 or 3, got shape {list(images.shape)}')
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])
        return images.to(self.device)

    @torch.no_grad()
    def probabilities(self, images):
        """Class probabilities [N, K] of uint8 images (K = 1008 for Inception-v3): the network's softmax without
        the output layer's bias, as the original Inception Score computes them (StyleGAN3 / EDM call it so)."""
        probs = self.net(self._prepare(images), no_output_bias=True)
        if probs.ndim != 2 or probs.shape[0] != images.shape[0]:
            raise RuntimeError(f'Detector "{self.name}" returned class probabilities of shape {list(probs.shape)}, '
                               f'expected [N, K]: is it the Inception-v3 detector?')
        return probs.to(torch.float32)

    @torch.no_grad()
    def __call__(self, images):
        features = self.net(self._prepare(images), return_features=True)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise RuntimeError(f'Detector "{self.name}" returned features of shape {list(features.shape)}, '
                               f'expected [N, {self.feature_dim}]: is it the Inception-v3 FID detector?')
        return features.to(torch.float32)

    def __repr__(self):
        return f'Detector(name={self.name!r}, device={self.device}, is_standin={self.is_standin})'

#----------------------------------------------------------------------------

def resolve_detector_spec(spec=None):
    """The detector spec to use: `spec` if given, else $EOT_FID_DETECTOR if set, else the default URL."""
    if spec is None or str(spec).strip() == '':
        spec = os.environ.get(DETECTOR_ENV, '').strip() or DEFAULT_DETECTOR_URL
    return str(spec)


def parse_standin_spec(spec):
    """The seed of a 'standin' or 'standin:SEED' spec, or None if `spec` names no stand-in."""
    m = re.fullmatch(r'standin(?::(.*))?', str(spec).strip())
    if m is None:
        return None
    if m.group(1) is None:
        return 0
    try:
        return int(m.group(1))
    except ValueError:
        raise ValueError(f'Bad stand-in detector spec "{spec}": use "standin:SEED" with an integer SEED, '
                         f'e.g. "standin:0"') from None


def _local_copy_hint(location):
    return (f'To use a local copy, download {DEFAULT_DETECTOR_URL} on a machine with network access and pass '
            f'--detector=/path/to/inception-2015-12-05.pkl (or set {DETECTOR_ENV}=/path/to/inception-2015-12-05.pkl); '
            f'"standin:SEED" selects a test stand-in whose numbers are not FID.')


def _fetch_detector_file(spec, verbose):
    """Local filename of the detector file named by `spec` (a path or URL), downloading it if needed."""
    try:
        return dnnlib.util.open_url(spec, cache=True, verbose=verbose, return_filename=True)
    except dnnlib.util.DownloadError as err:
        raise DetectorUnavailable(f'Cannot load the FID detector from "{spec}": {err} {_local_copy_hint(spec)}') from err
    except FileNotFoundError as err:
        raise DetectorUnavailable(f'Cannot load the FID detector: no such file "{spec}". {_local_copy_hint(spec)}') from err


def _check_known_file(spec, filename):
    """The default detector's file must have its known sha256: a damaged or replaced cached download is refused
    before it is unpickled (unpickling runs code). Files given by path or another URL are trusted as given."""
    if spec != DEFAULT_DETECTOR_URL:
        return
    digest = hashlib.sha256()
    with open(filename, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    if digest.hexdigest() != DEFAULT_DETECTOR_SHA256:
        raise DetectorUnavailable(f'The detector file "{filename}" (from {spec}) has sha256 {digest.hexdigest()[:12]}..., '
                                  f'not the {DEFAULT_DETECTOR_SHA256[:12]}... of that URL: damaged or replaced, and not '
                                  f'unpickled; delete it to download it again, or pass --detector=PATH of a copy you trust')


def _load_net_file(filename, spec):
    """Load a detector network from a pickle (StyleGAN3/EDM .pkl; unpickling runs code) or a TorchScript
    archive (.pt). DetectorUnavailable, with one line, when the file holds no loadable network."""
    try:
        if zipfile.is_zipfile(filename):
            net = torch.jit.load(filename, map_location='cpu')
        else:
            with open(filename, 'rb') as f:
                net = pickle.load(f)
    except Exception as err: # Unpickling errors of any kind, TorchScript format errors, missing modules, ...
        raise DetectorUnavailable(f'Cannot load the detector from "{spec}" ({type(err).__name__}: '
                                  f'{str(err).splitlines()[0] if str(err) else ""}); pass the Inception-v3 pickle '
                                  f'or TorchScript file ({DEFAULT_DETECTOR_URL}) or "standin:SEED"') from None
    if not isinstance(net, torch.nn.Module):
        raise DetectorUnavailable(f'"{spec}" holds a {type(net).__name__}, not a network; pass the Inception-v3 '
                                  f'pickle or TorchScript file ({DEFAULT_DETECTOR_URL})')
    return net


def load_detector(spec=None, device=None, verbose=True):
    """Load the FID feature detector.

    Args:
        spec: None (the $EOT_FID_DETECTOR environment variable if set, else DEFAULT_DETECTOR_URL), a local
            path, an http(s)/file URL (downloads are cached by dnnlib.util.open_url), or 'standin:SEED'
            for the seeded test stand-in (its numbers are not FID).
        device: torch device for the network (default: torch_utils.distributed.device()).
        verbose: print download progress on rank 0.
    Returns:
        A Detector; `detector(uint8 NCHW images)` gives float32 [N, 2048] features.
    Raises:
        DetectorUnavailable if the file cannot be found, downloaded or loaded, or the spec is malformed (the
        message says how to pass a local copy). Under torchrun every rank raises it together; rank 0 downloads
        first.
    """
    spec = resolve_detector_spec(spec)
    device = dist_utils.device() if device is None else torch.device(device)
    try:
        seed = parse_standin_spec(spec)
    except ValueError as err:
        raise DetectorUnavailable(str(err)) from None
    if seed is not None:
        return Detector(StandInDetector(seed=seed).to(device), name=f'standin:{seed}', device=device, is_standin=True)

    # Rank 0 fetches (and caches) the file first; the others read the cached copy, or fail with it.
    filename, error = None, None
    if dist_utils.get_rank() == 0:
        try:
            filename = _fetch_detector_file(spec, verbose=verbose)
        except DetectorUnavailable as err:
            error = str(err)
    error = dist_utils.broadcast_object(error)
    if error is not None:
        raise DetectorUnavailable(error)
    if filename is None:
        filename = _fetch_detector_file(spec, verbose=False)
    _check_known_file(spec, filename)
    net = _load_net_file(filename, spec).eval().to(device) # Called under no_grad (TorchScript has no requires_grad_).
    return Detector(net, name=spec, device=device, is_standin=False)

#----------------------------------------------------------------------------
