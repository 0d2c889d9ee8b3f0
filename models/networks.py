"""Networks: a DDPM++-style U-Net, MLPs for vectors, the EOT networks G, f and D, and a
preconditioned diffusion denoiser (EDM, VP and VE preconditioning, Karras et al. 2022, Table 1).

EOT networks (images [N, C, R, R] in [-1, 1], or vectors [N, D]):
    G(x, z=None) -> x.shape    z: [N, *G.z_shape] noise, drawn with torch.randn when omitted
    f(x, t)      -> x.shape    t: [N] in [0, 1], or a python float / 0-d tensor (broadcast)
    D(x)         -> [N]        one critic value per sample
Build them with `eot_network_kwargs(data_shape, model_channels)` and
`dnnlib.util.construct_class_by_name(**kwargs)`; the denoiser with `denoiser_kwargs(...)`.

Every class here is a persistent class (torch_utils.persistence): snapshots carry this file's source
and load after it has changed or gone. So this module imports only torch, numpy and torch_utils at
import time (the factories import dnnlib when called), and every nn.Module defined here is decorated.
"""

import inspect
import math

import numpy as np
import torch
from torch.nn import functional as F

from torch_utils import persistence

#----------------------------------------------------------------------------
# Small helpers.

def group_count(channels, max_groups=32, min_channels_per_group=4):
    """Number of GroupNorm groups for `channels`: the largest divisor of `channels` that is at most
    min(max_groups, channels // min_channels_per_group), and at least 1 (so small layers still work)."""
    g = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % g != 0:
        g -= 1
    return g


def _group_norm(channels):
    return torch.nn.GroupNorm(group_count(channels), channels, eps=1e-6)


def _zero_(layer):
    torch.nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        torch.nn.init.zeros_(layer.bias)
    return layer


def per_sample(value, n, name='t', device=None):
    """`value` (python number, 0-d tensor, [N] or [N, 1, ...] tensor) as a float32 [n] tensor."""
    v = torch.as_tensor(value, dtype=torch.float32, device=device)
    if v.numel() == 1 and v.ndim <= 1:
        return v.reshape(1).expand(n)
    if v.ndim >= 1 and v.shape[0] == n and v.numel() == n:
        return v.reshape(n)
    raise ValueError(f'{name} must be a python float, a 0-d tensor or a tensor of shape [N] = [{n}] '
                     f'(trailing size-1 dims allowed); got shape {list(v.shape)}')


def _check_input(x, data_shape, who):
    if not isinstance(x, torch.Tensor) or x.ndim != len(data_shape) + 1 or tuple(x.shape[1:]) != tuple(data_shape):
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'{who} expects input of shape [N, {", ".join(map(str, data_shape))}]; got {got}')


def _check_channel_mult(channel_mult, img_resolution):
    channel_mult = [int(m) for m in channel_mult]
    if len(channel_mult) == 0 or min(channel_mult) < 1:
        raise ValueError(f'channel_mult must be a non-empty list of positive ints; got {channel_mult}')
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution % factor != 0 or img_resolution // factor < 1:
        raise ValueError(f'img_resolution={img_resolution} is not divisible by 2^(len(channel_mult)-1) = {factor} '
                         f'(channel_mult={channel_mult}); use fewer levels or a resolution that is a multiple of {factor}')
    return channel_mult

#----------------------------------------------------------------------------
# Building blocks.

@persistence.persistent_class
class Resample(torch.nn.Module):
    """Up- or down-sampling by 2 with a separable FIR filter: [1,1] is box (average pooling /
    nearest upsampling), [1,3,3,1] the binomial filter of DDPM++ / StyleGAN2."""

    def __init__(self, channels, mode, resample_filter=(1, 1)):
        super().__init__()
        if mode not in ('up', 'down'):
            raise ValueError(f'Resample mode must be "up" or "down"; got {mode!r}')
        k = torch.as_tensor(np.asarray(resample_filter, dtype=np.float32))
        if k.ndim != 1 or k.numel() < 2 or bool((k < 0).any()) or float(k.sum()) <= 0:
            raise ValueError(f'resample_filter must be a 1-D list of >= 2 non-negative taps with a positive sum, '
                             f'e.g. [1,1] or [1,3,3,1]; got {list(resample_filter)}')
        k = k / k.sum()
        kernel = torch.outer(k, k) * (4 if mode == 'up' else 1) # Upsampling keeps the mean: gain 4.
        self.channels = channels
        self.mode = mode
        self.padding = (k.numel() - 1) // 2
        # conv_transpose2d gives 2 (H - 1) - 2 padding + taps + output_padding; make that 2 H.
        self.output_padding = 2 + 2 * self.padding - k.numel()
        self.register_buffer('kernel', kernel[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x):
        w = self.kernel.to(x.dtype)
        if self.mode == 'down':
            return F.conv2d(x, w, stride=2, padding=self.padding, groups=self.channels)
        return F.conv_transpose2d(x, w, stride=2, padding=self.padding, output_padding=self.output_padding,
                                  groups=self.channels)


@persistence.persistent_class
class TimeEmbedding(torch.nn.Module):
    """[N] time or noise labels -> [N, channels] cos/sin features. 'positional': fixed frequencies
    (1 / max_positions)^(i / half) (transformer / DDPM); 'fourier': random Gaussian frequencies with
    std `fourier_scale` (NCSN++), drawn at construction from torch's global generator."""

    def __init__(self, channels, embedding_type='positional', max_positions=10000, fourier_scale=16.0):
        super().__init__()
        if channels < 2 or channels % 2 != 0:
            raise ValueError(f'TimeEmbedding needs an even number of channels >= 2; got {channels}')
        half = channels // 2
        if embedding_type == 'positional':
            freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half)
        elif embedding_type == 'fourier':
            freqs = 2 * math.pi * fourier_scale * torch.randn(half)
        else:
            raise ValueError(f'embedding_type must be "positional", "fourier" or None; got {embedding_type!r}')
        self.embedding_type = embedding_type
        self.register_buffer('freqs', freqs)

    def forward(self, t):
        angles = t.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


@persistence.persistent_class
class ResBlock(torch.nn.Module):
    """DDPM++ residual block: GroupNorm-SiLU-(resample)-conv3x3, + time embedding, GroupNorm-SiLU-
    dropout-conv3x3, skip (1x1 conv when channels change), sum scaled by `skip_scale`; then optional
    multi-head self-attention with its own residual."""

    def __init__(self, in_channels, out_channels, emb_channels=0, resample=None, attention=False, dropout=0.0,
                 resample_filter=(1, 1), skip_scale=math.sqrt(0.5), channels_per_head=64, zero_init=True):
        super().__init__()
        self.skip_scale = skip_scale
        self.norm0 = _group_norm(in_channels)
        self.resample = Resample(in_channels, resample, resample_filter) if resample is not None else None
        self.conv0 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = torch.nn.Linear(emb_channels, out_channels) if emb_channels > 0 else None
        self.norm1 = _group_norm(out_channels)
        self.dropout = torch.nn.Dropout(dropout)
        self.conv1 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = torch.nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.num_heads = max(1, out_channels // channels_per_head) if attention else 0
        if attention:
            self.norm2 = _group_norm(out_channels)
            self.qkv = torch.nn.Conv2d(out_channels, out_channels * 3, 1)
            self.proj = torch.nn.Conv2d(out_channels, out_channels, 1)
        if zero_init: # Each block starts as (scaled) identity: stable deep residual stacks.
            _zero_(self.conv1)
            if attention:
                _zero_(self.proj)

    def forward(self, x, emb=None):
        h = F.silu(self.norm0(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv0(h)
        if self.affine is not None:
            if emb is None:
                raise ValueError('This block was built with a time embedding; pass noise labels to the network')
            h = h + self.affine(emb)[:, :, None, None].to(h.dtype)
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        x = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads > 0:
            x = (self._attention(self.norm2(x)) + x) * self.skip_scale
        return x

    def _attention(self, y):
        n, c, hgt, wid = y.shape
        q, k, v = self.qkv(y).reshape(n, 3, self.num_heads, c // self.num_heads, hgt * wid).unbind(1)
        # softmax(q k^T / sqrt(d)) v over the H*W positions, per head.
        o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return self.proj(o.transpose(-1, -2).reshape(n, c, hgt, wid))


@persistence.persistent_class
class UNetEncoder(torch.nn.Module):
    """The contracting half of the U-Net: conv3x3 in, then per level `num_blocks` ResBlocks (a
    downsampling ResBlock first on every level but the top). Returns the last activation and the
    list of every intermediate activation (the decoder's skips)."""

    def __init__(self, img_resolution, in_channels, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                 attn_resolutions=(16,), dropout=0.0, emb_channels=0, resample_filter=(1, 1), zero_init=True):
        super().__init__()
        channel_mult = _check_channel_mult(channel_mult, img_resolution)
        if num_blocks < 1:
            raise ValueError(f'num_blocks must be >= 1; got {num_blocks}')
        block_kwargs = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter,
                            zero_init=zero_init)
        self.conv_in = torch.nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.blocks = torch.nn.ModuleList()
        self.skip_channels = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.blocks.append(ResBlock(ch, ch, resample='down', **block_kwargs))
                self.skip_channels.append(ch)
            for _ in range(num_blocks):
                self.blocks.append(ResBlock(ch, model_channels * mult, attention=res in attn_resolutions, **block_kwargs))
                ch = model_channels * mult
                self.skip_channels.append(ch)
        self.out_channels = ch

    def forward(self, x, emb=None):
        x = self.conv_in(x)
        skips = [x]
        for block in self.blocks:
            x = block(x, emb)
            skips.append(x)
        return x, skips


@persistence.persistent_class
class UNet(torch.nn.Module):
    """DDPM++-style U-Net: x [N, in_channels, R, R] (and noise labels [N] when `embedding_type` is
    not None) -> [N, out_channels, R, R].

    Encoder as in UNetEncoder; decoder: two ResBlocks at the lowest resolution (the first with
    attention when `mid_attention`), then per level an upsampling ResBlock (below the top level) and
    `num_blocks + 1` ResBlocks, each taking one encoder activation concatenated to its input;
    GroupNorm-SiLU-conv3x3 out. Attention at the resolutions in `attn_resolutions`. The time
    embedding (`embedding_type` 'positional', 'fourier' or None for no time input) feeds a 2-layer
    SiLU MLP of width `channel_mult_emb * model_channels`, added in every block. GroupNorm uses
    group_count(channels) groups. `zero_init` starts the last conv of every block, every attention
    projection and the output conv at zero (the output is then 0 until the first step).
    """

    def __init__(self, img_resolution, in_channels, out_channels, model_channels=128, channel_mult=(2, 2, 2),
                 num_blocks=4, attn_resolutions=(16,), dropout=0.1, embedding_type='positional',
                 channel_mult_emb=4, fourier_scale=16.0, resample_filter=(1, 1), mid_attention=True, zero_init=True):
        super().__init__()
        channel_mult = _check_channel_mult(channel_mult, img_resolution)
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.embedding_type = embedding_type
        emb_channels = 0
        if embedding_type is not None:
            emb_channels = model_channels * channel_mult_emb
            self.embed = TimeEmbedding(model_channels, embedding_type, fourier_scale=fourier_scale)
            self.emb_layer0 = torch.nn.Linear(model_channels, emb_channels)
            self.emb_layer1 = torch.nn.Linear(emb_channels, emb_channels)
        block_kwargs = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter,
                            zero_init=zero_init)
        self.encoder = UNetEncoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                   attn_resolutions, **block_kwargs)
        skips = list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        self.decoder = torch.nn.ModuleList()
        self.takes_skip = [] # Per decoder block: whether it consumes an encoder activation.
        for level in reversed(range(len(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                new = [ResBlock(ch, ch, attention=mid_attention, **block_kwargs), ResBlock(ch, ch, **block_kwargs)]
            else:
                new = [ResBlock(ch, ch, resample='up', **block_kwargs)]
            self.decoder.extend(new)
            self.takes_skip += [False] * len(new)
            for _ in range(num_blocks + 1):
                cout = model_channels * channel_mult[level]
                self.decoder.append(ResBlock(ch + skips.pop(), cout, attention=res in attn_resolutions, **block_kwargs))
                self.takes_skip.append(True)
                ch = cout
        assert not skips
        self.norm_out = _group_norm(ch)
        self.conv_out = torch.nn.Conv2d(ch, out_channels, 3, padding=1)
        if zero_init:
            _zero_(self.conv_out)

    def forward(self, x, noise_labels=None):
        _check_input(x, (self.in_channels, self.img_resolution, self.img_resolution), 'UNet')
        emb = _embedding(self, noise_labels, x)
        x, skips = self.encoder(x, emb)
        for block, takes_skip in zip(self.decoder, self.takes_skip):
            if takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.conv_out(F.silu(self.norm_out(x)))


def _embedding(net, noise_labels, x):
    """The time embedding of `net` (UNet or MLP) for `noise_labels`, or None for networks without time."""
    if net.embedding_type is None:
        if noise_labels is not None:
            raise ValueError('This network was built with embedding_type=None and takes no time input; '
                             'build it with embedding_type="positional" or "fourier" to pass one')
        return None
    if noise_labels is None:
        raise ValueError(f'This network was built with embedding_type={net.embedding_type!r}: pass noise labels '
                         '(a [N] tensor or a scalar)')
    t = per_sample(noise_labels, x.shape[0], 'noise_labels', x.device)
    emb = F.silu(net.emb_layer0(net.embed(t).to(net.emb_layer0.weight.dtype)))
    return F.silu(net.emb_layer1(emb))


@persistence.persistent_class
class MLP(torch.nn.Module):
    """Vector network: x [N, in_dim] (and noise labels [N] when `embedding_type` is not None) ->
    [N, out_dim]. `depth` hidden layers of `width` units, Linear -> (+ time embedding) -> SiLU ->
    dropout; a linear output layer (zero at start when `zero_init`)."""

    def __init__(self, in_dim, out_dim, width=256, depth=4, embedding_type='positional', fourier_scale=16.0,
                 dropout=0.0, zero_init=True):
        super().__init__()
        if depth < 1 or width < 2:
            raise ValueError(f'MLP needs depth >= 1 and width >= 2; got depth={depth}, width={width}')
        self.in_dim, self.out_dim = in_dim, out_dim
        self.embedding_type = embedding_type
        self.layers = torch.nn.ModuleList(torch.nn.Linear(in_dim if i == 0 else width, width) for i in range(depth))
        if embedding_type is not None:
            self.embed = TimeEmbedding(width, embedding_type, fourier_scale=fourier_scale)
            self.emb_layer0 = torch.nn.Linear(width, width)
            self.emb_layer1 = torch.nn.Linear(width, width)
            self.affine = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.dropout = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(width, out_dim)
        if zero_init:
            _zero_(self.out)

    def forward(self, x, noise_labels=None):
        _check_input(x, (self.in_dim,), 'MLP')
        emb = _embedding(self, noise_labels, x)
        for i, layer in enumerate(self.layers):
            h = layer(x)
            if emb is not None:
                h = h + self.affine[i](emb)
            x = self.dropout(F.silu(h))
        return self.out(x)

#----------------------------------------------------------------------------
# EOT networks.

def _noise(x, z, z_shape):
    if z is None:
        return torch.randn([x.shape[0], *z_shape], dtype=x.dtype, device=x.device)
    if tuple(z.shape) != (x.shape[0], *z_shape):
        raise ValueError(f'G expects noise z of shape [N, {", ".join(map(str, z_shape))}] = '
                         f'{[x.shape[0], *z_shape]}; got {list(z.shape)} (omit z to draw it)')
    return z.to(x.dtype)


def _time_scale(time_scale, embedding_type):
    # The positional embedding's frequencies suit labels in [0, 1000] (DDPM steps), Fourier ones [0, 1].
    if time_scale is not None:
        return float(time_scale)
    return 1000.0 if embedding_type == 'positional' else 1.0


def _end_point_from_velocity(x, t, v):
    # f(x, t) = x + (1 - t) v(x, t): the drift (f - x) / (1 - t) of the SDE is v itself, and f - x vanishes at t = 1.
    tt = per_sample(t, x.shape[0], 't', x.device).to(v.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x + (1 - tt) * v


@persistence.persistent_class
class UNetGenerator(torch.nn.Module):
    """EOT generator for images: G(x, z) with x [N, C, R, R], z [N, 1, R, R] (one noise channel,
    concatenated to x) -> [N, C, R, R]. `G.z_shape = (1, R, R)`. With `residual`, returns x + U-Net."""

    def __init__(self, img_resolution, img_channels, model_channels=32, channel_mult=(2, 2, 2), num_blocks=4,
                 attn_resolutions=(16,), dropout=0.1, resample_filter=(1, 1), zero_init=True, residual=False):
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.data_shape = (img_channels, img_resolution, img_resolution)
        self.z_shape = (1, img_resolution, img_resolution)
        self.residual = residual
        self.net = UNet(img_resolution, img_channels + 1, img_channels, model_channels, channel_mult, num_blocks,
                        attn_resolutions, dropout, embedding_type=None, resample_filter=resample_filter,
                        zero_init=zero_init)

    def forward(self, x, z=None):
        _check_input(x, self.data_shape, 'G')
        out = self.net(torch.cat([x, _noise(x, z, self.z_shape)], dim=1))
        return x + out if self.residual else out


@persistence.persistent_class
class UNetDrift(torch.nn.Module):
    """EOT drift network for images: f(x, t) with x [N, C, R, R], t in [0, 1] ([N] or scalar) ->
    predicted end point [N, C, R, R]. t is multiplied by `time_scale` (default 1000 for the
    positional embedding, 1 for Fourier) before the embedding."""

    def __init__(self, img_resolution, img_channels, model_channels=32, channel_mult=(2, 2, 2), num_blocks=4,
                 attn_resolutions=(16,), dropout=0.1, resample_filter=(1, 1), zero_init=True,
                 embedding_type='positional', fourier_scale=16.0, time_scale=None):
        super().__init__()
        if embedding_type is None:
            raise ValueError('f needs a time embedding: embedding_type must be "positional" or "fourier", not None')
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.data_shape = (img_channels, img_resolution, img_resolution)
        self.time_scale = _time_scale(time_scale, embedding_type)
        self.net = UNet(img_resolution, img_channels, img_channels, model_channels, channel_mult, num_blocks,
                        attn_resolutions, dropout, embedding_type=embedding_type, fourier_scale=fourier_scale,
                        resample_filter=resample_filter, zero_init=zero_init)

    def forward(self, x, t):
        _check_input(x, self.data_shape, 'f')
        return self.net(x, per_sample(t, x.shape[0], 't', x.device) * self.time_scale)


@persistence.persistent_class
class UNetVelocityDrift(UNetDrift):
    """UNetDrift parameterised as f(x, t) = x + (1 - t) v(x, t), v the U-Net (see VelocityDrift)."""

    def forward(self, x, t):
        return _end_point_from_velocity(x, t, super().forward(x, t))


@persistence.persistent_class
class UNetCritic(torch.nn.Module):
    """EOT critic for images: D(x) with x [N, C, R, R] -> [N]. The U-Net encoder, GroupNorm-SiLU,
    global average pooling and a linear head."""

    def __init__(self, img_resolution, img_channels, model_channels=64, channel_mult=(2, 2, 2), num_blocks=4,
                 attn_resolutions=(16,), dropout=0.0, resample_filter=(1, 1), zero_init=True):
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.data_shape = (img_channels, img_resolution, img_resolution)
        self.encoder = UNetEncoder(img_resolution, img_channels, model_channels, channel_mult, num_blocks,
                                   attn_resolutions, dropout, resample_filter=resample_filter, zero_init=zero_init)
        self.norm_out = _group_norm(self.encoder.out_channels)
        self.head = torch.nn.Linear(self.encoder.out_channels, 1)

    def forward(self, x):
        _check_input(x, self.data_shape, 'D')
        h, _ = self.encoder(x)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3))).squeeze(1)


@persistence.persistent_class
class MLPGenerator(torch.nn.Module):
    """EOT generator for vectors: G(x, z) with x [N, dim], z [N, noise_dim] (concatenated) -> [N, dim].
    `G.z_shape = (noise_dim,)`, noise_dim = dim by default (fewer noise dimensions cap the rank of the conditional
    law y | x at noise_dim: docs/eot_benchmarks.md). With `residual`, returns x + MLP. With `noise_skip`, adds
    s * z, s a learned per-dimension scale (zero at start; needs noise_dim = dim): a direct path for the spread
    that every conditional law y | x of an entropic plan has in every direction, which the MLP, its noise mixed
    with x in `width` hidden units, otherwise squeezes into a few directions at large dim (docs/eot_benchmarks.md,
    "The noise path")."""

    def __init__(self, dim, noise_dim=None, width=256, depth=4, dropout=0.0, zero_init=True, residual=False,
                 noise_skip=False):
        super().__init__()
        noise_dim = dim if noise_dim is None else int(noise_dim)
        if noise_dim < 1:
            raise ValueError(f'noise_dim must be >= 1 (G needs noise to be stochastic); got {noise_dim}')
        if noise_skip and noise_dim != dim:
            raise ValueError(f'noise_skip adds s * z to G\'s output and needs noise_dim = dim = {dim}; got '
                             f'noise_dim={noise_dim} (drop noise_dim or set noise_skip to false)')
        self.dim, self.data_shape, self.z_shape = dim, (dim,), (noise_dim,)
        self.residual = residual
        self.net = MLP(dim + noise_dim, dim, width, depth, embedding_type=None, dropout=dropout, zero_init=zero_init)
        self.noise_scale = torch.nn.Parameter(torch.zeros(dim)) if noise_skip else None

    def forward(self, x, z=None):
        _check_input(x, self.data_shape, 'G')
        z = _noise(x, z, self.z_shape)
        out = self.net(torch.cat([x, z], dim=1))
        if self.noise_scale is not None:
            out = out + self.noise_scale.to(out.dtype) * z
        return x + out if self.residual else out


@persistence.persistent_class
class MLPDrift(torch.nn.Module):
    """EOT drift network for vectors: f(x, t) with x [N, dim], t in [0, 1] ([N] or scalar) -> [N, dim]."""

    def __init__(self, dim, width=256, depth=4, dropout=0.0, zero_init=True, embedding_type='positional',
                 fourier_scale=16.0, time_scale=None):
        super().__init__()
        if embedding_type is None:
            raise ValueError('f needs a time embedding: embedding_type must be "positional" or "fourier", not None')
        self.dim, self.data_shape = dim, (dim,)
        self.time_scale = _time_scale(time_scale, embedding_type)
        self.net = MLP(dim, dim, width, depth, embedding_type=embedding_type, fourier_scale=fourier_scale,
                       dropout=dropout, zero_init=zero_init)

    def forward(self, x, t):
        _check_input(x, self.data_shape, 'f')
        return self.net(x, per_sample(t, x.shape[0], 't', x.device) * self.time_scale)


@persistence.persistent_class
class VelocityDrift(MLPDrift):
    """MLPDrift parameterised as f(x, t) = x + (1 - t) v(x, t), v the MLP (same arguments and interface).

    f - x vanishes like (1 - t) whatever v's error, which the 1 / (1 - t)^2-weighted (kinetic) G-step needs
    (models.eot_loss.KineticEOTLoss; with a plain MLP f its error near t = 1 is amplified and G exploits it)."""

    def forward(self, x, t):
        return _end_point_from_velocity(x, t, super().forward(x, t))


@persistence.persistent_class
class MLPCritic(torch.nn.Module):
    """EOT critic for vectors: D(x) with x [N, dim] -> [N]."""

    def __init__(self, dim, width=256, depth=4, dropout=0.0, zero_init=True):
        super().__init__()
        self.dim, self.data_shape = dim, (dim,)
        self.net = MLP(dim, 1, width, depth, embedding_type=None, dropout=dropout, zero_init=zero_init)

    def forward(self, x):
        _check_input(x, self.data_shape, 'D')
        return self.net(x).squeeze(1)

#----------------------------------------------------------------------------
# Diffusion denoiser with preconditioning (Karras et al. 2022, "Elucidating the design space of
# diffusion-based generative models", Table 1).

def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    """VP noise level at time t: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return ((0.5 * beta_d * t ** 2 + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1):
    """Inverse of vp_sigma: t = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d


def precond_coefficients(kind, sigma, sigma_data=0.5, beta_d=19.9, beta_min=0.1, M=1000):
    """(c_skip, c_out, c_in, c_noise) of Karras et al. 2022, Table 1, for noise levels `sigma` (a tensor
    or number; results have its shape and float dtype). The denoiser is
    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).
      'vp':  1, -sigma, 1 / sqrt(sigma^2 + 1), (M - 1) vp_sigma_inv(sigma)
      've':  1, sigma, 1, log(sigma / 2)
      'edm': sigma_data^2 / (sigma^2 + sigma_data^2), sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
             1 / sqrt(sigma^2 + sigma_data^2), log(sigma) / 4
    """
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float32)
    one = torch.ones_like(sigma)
    if kind == 'vp':
        return one, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (M - 1) * vp_sigma_inv(sigma, beta_d, beta_min)
    if kind == 've':
        return one, sigma, one, (0.5 * sigma).log()
    if kind == 'edm':
        s2 = sigma ** 2 + sigma_data ** 2
        return sigma_data ** 2 / s2, sigma * sigma_data / s2.sqrt(), 1 / s2.sqrt(), sigma.log() / 4
    raise ValueError(f'precond must be "edm", "vp" or "ve"; got {kind!r}')


@persistence.persistent_class
class Denoiser(torch.nn.Module):
    """Preconditioned denoiser D(x, sigma) -> denoised x (same shape, float32), for DPM-OT sampling.

    data_shape: (C, R, R) for images (U-Net backbone) or (dim,) for vectors (MLP backbone, with
    `model_channels` as its width). precond: 'edm', 'vp' or 've' (see precond_coefficients).
    sigma_min / sigma_max default to EDM's: edm 0.002 / 80, ve 0.02 / 100, vp sigma(epsilon_t) / sigma(1).
    The embedding defaults to 'fourier' for ve and 'positional' otherwise (DDPM++ / NCSN++ as in EDM).
    backbone_kwargs go to UNet (channel_mult, num_blocks, attn_resolutions, dropout, ...) or MLP
    (depth, dropout, ...).
    """

    def __init__(self, data_shape, precond='edm', model_channels=128, sigma_data=0.5, sigma_min=None,
                 sigma_max=None, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, **backbone_kwargs):
        super().__init__()
        self.data_shape = _check_data_shape(data_shape)
        if precond not in ('edm', 'vp', 've'):
            raise ValueError(f'precond must be "edm", "vp" or "ve"; got {precond!r}')
        self.precond = precond
        self.sigma_data = float(sigma_data)
        self.label_dim = 0 # EDM's attribute: no class conditioning.
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        default_min, default_max = dict(edm=(0.002, 80.0), ve=(0.02, 100.0),
                                        vp=(float(vp_sigma(epsilon_t, beta_d, beta_min)),
                                            float(vp_sigma(1.0, beta_d, beta_min))))[precond]
        self.sigma_min = float(default_min if sigma_min is None else sigma_min)
        self.sigma_max = float(default_max if sigma_max is None else sigma_max)
        backbone_kwargs.setdefault('embedding_type', 'fourier' if precond == 've' else 'positional')
        if backbone_kwargs['embedding_type'] is None:
            raise ValueError('The denoiser needs a noise-level embedding: embedding_type "positional" or "fourier"')
        if len(self.data_shape) == 3:
            self.img_channels, self.img_resolution = self.data_shape[0], self.data_shape[1]
            self.model = UNet(self.img_resolution, self.img_channels, self.img_channels, model_channels, **backbone_kwargs)
        else:
            self.img_channels = self.img_resolution = None
            dim = self.data_shape[0]
            self.model = MLP(dim, dim, width=model_channels, **backbone_kwargs)

    def precond_coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) of this denoiser at `sigma`."""
        return precond_coefficients(self.precond, sigma, self.sigma_data, self.beta_d, self.beta_min, self.M)

    def round_sigma(self, sigma):
        """Noise levels this denoiser supports nearest to `sigma` (continuous: `sigma` as a tensor)."""
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        """Denoised x for noisy x [N, *data_shape] at noise level sigma ([N] or scalar). `class_labels`
        exists for EDM-style samplers that pass None; this denoiser is unconditional."""
        if class_labels is not None:
            raise ValueError('This Denoiser is unconditional (label_dim=0); pass class_labels=None')
        _check_input(x, self.data_shape, 'Denoiser')
        x = x.to(torch.float32)
        sigma = per_sample(sigma, x.shape[0], 'sigma', x.device).reshape(-1, *([1] * len(self.data_shape)))
        c_skip, c_out, c_in, c_noise = self.precond_coefficients(sigma)
        F_x = self.model(c_in * x, c_noise.flatten())
        return c_skip * x + c_out * F_x.to(torch.float32)

#----------------------------------------------------------------------------
# Factories: *_kwargs dicts for dnnlib.util.construct_class_by_name.

def _check_data_shape(data_shape):
    shape = tuple(int(s) for s in data_shape)
    ok = (len(shape) == 1 and shape[0] >= 1) or (len(shape) == 3 and shape[0] >= 1 and shape[1] == shape[2] >= 1)
    if not ok:
        raise ValueError(f'data_shape must be (C, H, W) with H == W for images or (D,) for vectors; got {data_shape}')
    return shape


def _param_names(cls):
    # The constructor that takes the arguments: skip the persistence decorators' (*args, **kwargs) ones, also
    # those of persistent base classes (a subclass such as VelocityDrift inherits its base's constructor).
    init = next(c.__dict__['__init__'] for c in cls.__mro__
                if '__init__' in c.__dict__ and not persistence.is_persistent(c))
    params = inspect.signature(init).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {'self'}


def _apply_overrides(kwargs_by_net, classes, overrides):
    """Per-network dicts (keys of `kwargs_by_net`) override that network; other keys override every
    network whose constructor accepts them."""
    for key, value in overrides.items():
        if key in kwargs_by_net:
            bad = sorted(set(value) - classes[key])
            if bad:
                raise ValueError(f'Unknown argument(s) {bad} for {key}; valid: {sorted(classes[key])}')
            kwargs_by_net[key].update(value)
            continue
        targets = [name for name in kwargs_by_net if key in classes[name]]
        if not targets:
            valid = sorted(set().union(*classes.values()))
            raise ValueError(f'Unknown network argument {key!r}={value!r}; valid: {valid} or per-network '
                             f'dicts {sorted(kwargs_by_net)}')
        for name in targets:
            kwargs_by_net[name][key] = value


DRIFTS = ('end_point', 'velocity')


def eot_network_kwargs(data_shape, model_channels=32, drift='end_point', **overrides):
    """(G_kwargs, f_kwargs, D_kwargs) for the EOT networks, each a dnnlib.EasyDict with `class_name`.

    data_shape: (C, H, W) images (H == W; U-Nets) or (D,) vectors (MLPs).
    Images: G and f use `model_channels` = c and channel_mult [2,2,2]; D the U-Net encoder with
    (c // 32 + 1) * 32 channels. Vectors: MLPs of depth 4 and width 8 c for G and f (256 at the
    default c = 32), 8 (c // 32 + 1) * 32 for D; G's noise_dim = D.
    drift: 'end_point' (f is the network: UNetDrift / MLPDrift) or 'velocity' (f = x + (1 - t) v:
    UNetVelocityDrift / VelocityDrift, for the kinetic G-step).
    overrides: `G=dict(...)`, `f=dict(...)`, `D=dict(...)` set one network's arguments; any other
    key (e.g. dropout=0, resample_filter=[1,3,3,1], width=128) goes to every network that accepts it.
    """
    import dnnlib # Here, not at the top: the module's embedded source must import only torch_utils.
    shape = _check_data_shape(data_shape)
    c = int(model_channels)
    if c < 1:
        raise ValueError(f'model_channels must be a positive int; got {model_channels}')
    if drift not in DRIFTS:
        raise ValueError(f'drift must be one of {DRIFTS}; got {drift!r}')
    velocity = drift == 'velocity'
    c_d = (c // 32 + 1) * 32
    if len(shape) == 3:
        common = dict(img_resolution=shape[1], img_channels=shape[0], channel_mult=[2, 2, 2])
        classes = dict(G=UNetGenerator, f=UNetVelocityDrift if velocity else UNetDrift, D=UNetCritic)
        kwargs = dict(G=dict(common, model_channels=c), f=dict(common, model_channels=c),
                      D=dict(common, model_channels=c_d))
    else:
        classes = dict(G=MLPGenerator, f=VelocityDrift if velocity else MLPDrift, D=MLPCritic)
        kwargs = dict(G=dict(dim=shape[0], width=8 * c, depth=4), f=dict(dim=shape[0], width=8 * c, depth=4),
                      D=dict(dim=shape[0], width=8 * c_d, depth=4))
    _apply_overrides(kwargs, {k: _param_names(v) for k, v in classes.items()}, overrides)
    return tuple(dnnlib.EasyDict(class_name=f'models.networks.{classes[k].__name__}', **kwargs[k])
                 for k in ('G', 'f', 'D'))


def denoiser_kwargs(data_shape, precond='edm', model_channels=None, **overrides):
    """Kwargs (dnnlib.EasyDict with `class_name`) for a Denoiser.

    Images: U-Net with `model_channels` (default 128, EDM's CIFAR-10 DDPM++), channel_mult [2,2,2].
    Vectors: MLP of depth 4 and width 8 * model_channels (default 256, as for eot_network_kwargs).
    overrides: Denoiser arguments (sigma_data, sigma_min, ...) or backbone ones (dropout, num_blocks, depth, ...).
    """
    import dnnlib
    shape = _check_data_shape(data_shape)
    if precond not in ('edm', 'vp', 've'):
        raise ValueError(f'precond must be "edm", "vp" or "ve"; got {precond!r}')
    if len(shape) == 3:
        kwargs = dict(model_channels=128 if model_channels is None else int(model_channels), channel_mult=[2, 2, 2])
        backbone = UNet
    else:
        kwargs = dict(model_channels=256 if model_channels is None else 8 * int(model_channels), depth=4)
        backbone = MLP
    valid = (_param_names(Denoiser) | _param_names(backbone)) - {'img_resolution', 'in_channels', 'out_channels',
                                                                 'in_dim', 'out_dim', 'width'}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f'Unknown Denoiser argument(s) {bad}; valid: {sorted(valid)}')
    kwargs.update(overrides)
    return dnnlib.EasyDict(class_name='models.networks.Denoiser', data_shape=list(shape), precond=precond, **kwargs)

#----------------------------------------------------------------------------
