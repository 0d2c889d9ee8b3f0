"""training.networks: shapes, gradients, time dependence, determinism, preconditioning against the
paper's formulas, resampling against brute force, summaries, and snapshots that load without the code."""

import copy
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import misc, persistence
from models import networks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(num_blocks=1, G=dict(model_channels=8), f=dict(model_channels=8), D=dict(model_channels=8))




def _build(kwargs, **extra):
    return dnnlib.util.construct_class_by_name(**dict(kwargs, **extra))


def _eot(data_shape, model_channels=8, **overrides):
    return [_build(k) for k in networks.eot_network_kwargs(data_shape, model_channels, **overrides)]

#----------------------------------------------------------------------------
# Shapes and interface.

@pytest.mark.parametrize('resolution', [8, 16, 32, 64])
@pytest.mark.parametrize('channels', [1, 3])
def test_image_shapes(resolution, channels):
    torch.manual_seed(0)
    shape = (channels, resolution, resolution)
    G, f, D = _eot(shape, attn_resolutions=[8], **TINY)
    x = torch.rand(2, *shape) * 2 - 1
    assert G.z_shape == (1, resolution, resolution)
    assert G(x).shape == x.shape and G(x, torch.randn(2, *G.z_shape)).shape == x.shape
    assert f(x, torch.rand(2)).shape == x.shape
    assert D(x).shape == (2,)
    den = _build(networks.denoiser_kwargs(shape, 'edm', 8, num_blocks=1))
    assert den(x, torch.rand(2) + 0.1).shape == x.shape
    assert (den.img_resolution, den.img_channels, den.data_shape) == (resolution, channels, shape)


@pytest.mark.parametrize('dim', [1, 2, 5, 64])
def test_vector_shapes(dim):
    torch.manual_seed(0)
    G, f, D = _eot((dim,), 4)
    x = torch.randn(3, dim)
    assert G.z_shape == (dim,)   # one noise dimension per coordinate: the conditional y | x may have full rank
    assert G(x).shape == x.shape and f(x, 0.5).shape == x.shape and D(x).shape == (3,)
    den = _build(networks.denoiser_kwargs((dim,), 've', 4))
    assert den(x, 2.0).shape == x.shape and den.img_resolution is None


def test_factory_defaults_and_overrides():
    G, f, D = networks.eot_network_kwargs((3, 32, 32))
    assert G.class_name == 'models.networks.UNetGenerator' and f.class_name == 'models.networks.UNetDrift'
    assert D.class_name == 'models.networks.UNetCritic'
    assert G.model_channels == f.model_channels == 32 and G.channel_mult == f.channel_mult == [2, 2, 2]
    for c, c_d in [(16, 32), (32, 64), (63, 64), (64, 96), (128, 160)]:
        assert networks.eot_network_kwargs((1, 16, 16), c)[2].model_channels == c_d
    G, f, D = networks.eot_network_kwargs((2,), 32, dropout=0.2, noise_dim=3, D=dict(depth=2))
    assert (G.width, f.width, D.width) == (256, 256, 512)
    assert G.noise_dim == 3 and 'noise_dim' not in f and 'noise_dim' not in D
    assert G.dropout == f.dropout == D.dropout == 0.2 and D.depth == 2 and G.depth == 4
    _, f, _ = networks.eot_network_kwargs((3, 16, 16), time_scale=1.0, embedding_type='fourier')
    assert f.time_scale == 1.0 and f.embedding_type == 'fourier'
    with pytest.raises(ValueError, match='bogus'):
        networks.eot_network_kwargs((3, 32, 32), bogus=1)
    with pytest.raises(ValueError, match='noise_dim'):
        networks.eot_network_kwargs((3, 32, 32), f=dict(noise_dim=2))
    with pytest.raises(ValueError, match=r'\(3, 32, 16\)'):
        networks.eot_network_kwargs((3, 32, 16))
    k = networks.denoiser_kwargs((3, 32, 32), 'vp', dropout=0.13, sigma_data=1.0)
    assert (k.precond, k.model_channels, k.dropout, k.sigma_data) == ('vp', 128, 0.13, 1.0)
    assert networks.denoiser_kwargs((2,)).model_channels == 256
    with pytest.raises(ValueError, match='depthh'):
        networks.denoiser_kwargs((2,), depthh=3)


@pytest.mark.parametrize('shape', [(3,), (2, 8, 8)])
def test_velocity_drift_is_x_plus_one_minus_t_times_the_plain_drift(shape):
    kwargs = dict(num_blocks=1, attn_resolutions=[], model_channels=8) if len(shape) == 3 else dict(width=16, depth=2)
    G_kw, f_kw, D_kw = networks.eot_network_kwargs(shape, drift='velocity', zero_init=False, time_scale=3.0, **kwargs)
    _, plain_kw, _ = networks.eot_network_kwargs(shape, zero_init=False, time_scale=3.0, **kwargs)
    assert f_kw.class_name.endswith('VelocityDrift') and f_kw.time_scale == 3.0   # overrides reach the subclass
    assert G_kw == networks.eot_network_kwargs(shape, zero_init=False, time_scale=3.0, **kwargs)[0]
    torch.manual_seed(0)
    f, plain = _build(f_kw).eval(), _build(plain_kw).eval()   # eval: the U-Net has dropout
    plain.load_state_dict(f.state_dict())                     # same parameters, other parameterisation
    x, t = torch.randn(4, *shape), torch.tensor([0.0, 0.25, 0.9, 1.0])
    with torch.no_grad():
        expect = x + (1 - t).reshape(-1, *[1] * len(shape)) * plain(x, t)
        assert torch.allclose(f(x, t), expect, atol=1e-6)
        assert torch.equal(f(x, 1.0), x) and not torch.allclose(f(x, 0.0), x)
    with pytest.raises(ValueError, match='drift'):
        networks.eot_network_kwargs(shape, drift='score')


def test_noise_skip_adds_a_learned_scale_of_z():
    """With noise_skip, G(x, z) = x + MLP(x, z) + s * z: written out with the MLP's own output; s starts at zero and
    gets a gradient; noise_dim != dim is refused."""
    torch.manual_seed(0)
    G = networks.MLPGenerator(3, width=8, depth=2, zero_init=False, residual=True, noise_skip=True)
    assert torch.equal(G.noise_scale, torch.zeros(3))
    with torch.no_grad():
        G.noise_scale.copy_(torch.tensor([0.5, -2.0, 3.0]))
    x, z = torch.randn(4, 3), torch.randn(4, 3)
    expected = x + G.net(torch.cat([x, z], dim=1)) + torch.tensor([0.5, -2.0, 3.0]) * z
    assert torch.allclose(G(x, z), expected)
    G(x, z).square().sum().backward()
    assert G.noise_scale.grad is not None and G.noise_scale.grad.abs().min() > 0
    with pytest.raises(ValueError, match='noise_dim=2'):
        networks.MLPGenerator(3, noise_dim=2, noise_skip=True)


def test_input_errors_name_the_problem():
    G, f, D = _eot((3, 16, 16), **TINY)
    with pytest.raises(ValueError, match=r'\[N, 3, 16, 16\]; got \[2, 3, 8, 8\]'):
        D(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r'noise z of shape.*got \[2, 2, 16, 16\]'):
        G(torch.zeros(2, 3, 16, 16), torch.zeros(2, 2, 16, 16))
    with pytest.raises(ValueError, match=r'got shape \[3\]'):
        f(torch.zeros(2, 3, 16, 16), torch.zeros(3))
    with pytest.raises(ValueError, match='img_resolution=12'):
        networks.UNet(12, 1, 1, 8, channel_mult=[1, 1, 1, 1], num_blocks=1)
    with pytest.raises(ValueError, match='takes no time input'):
        networks.UNet(8, 1, 1, 8, num_blocks=1, embedding_type=None)(torch.zeros(1, 1, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match=r'\[-1, 2\]'):
        networks.Resample(4, 'down', [-1, 2])


def test_time_broadcast_forms_agree():
    torch.manual_seed(1)
    _, f, _ = _eot((1, 8, 8), zero_init=False, dropout=0, **TINY)
    _, fv, _ = _eot((3,), 4, zero_init=False)
    for net, x in [(f, torch.randn(4, 1, 8, 8)), (fv, torch.randn(4, 3))]:
        ref = net(x, torch.full([4], 0.3))
        for t in [0.3, torch.tensor(0.3), torch.tensor([0.3]), torch.full([4, 1, 1, 1], 0.3)]:
            assert torch.equal(net(x, t), ref)

#----------------------------------------------------------------------------
# Gradients, time dependence, determinism.

def _all_nets(zero_init):
    torch.manual_seed(2)
    img = _eot((3, 16, 16), attn_resolutions=[8, 16], zero_init=zero_init, dropout=0, **TINY)
    vec = _eot((3,), 4, zero_init=zero_init)
    dens = [_build(networks.denoiser_kwargs(s, p, 8 if len(s) == 3 else 4, zero_init=zero_init, dropout=0,
                                            **(dict(num_blocks=1, attn_resolutions=[8]) if len(s) == 3 else {})))
            for s, p in [((3, 16, 16), 'edm'), ((3, 16, 16), 've'), ((3,), 'vp')]]
    return img, vec, dens


def _outputs(img, vec, dens, seed=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for (G, f, D), shape in [(img, (3, 16, 16)), (vec, (3,))]:
        x = torch.rand([4, *shape], generator=gen) * 2 - 1
        out += [G(x, torch.randn([4, *G.z_shape], generator=gen)), f(x, torch.rand([4], generator=gen)), D(x)]
    for den in dens:
        x = torch.randn([4, *den.data_shape], generator=gen)
        out.append(den(x, torch.rand([4], generator=gen) * 5 + 0.05))
    return out


@pytest.mark.parametrize('zero_init', [False, True])
def test_every_parameter_gets_a_gradient(zero_init):
    img, vec, dens = _all_nets(zero_init)
    nets = [*img, *vec, *dens]
    gen = torch.Generator().manual_seed(4)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in _outputs(img, vec, dens))
    loss.backward()
    for net in nets:
        for name, p in net.named_parameters():
            assert p.grad is not None, f'{type(net).__name__}.{name} got no gradient'
            if not zero_init: # With zero-initialised output layers, only those get non-zero grads at first.
                assert p.grad.abs().sum() > 0, f'{type(net).__name__}.{name} got a zero gradient'


def test_time_input_changes_output():
    torch.manual_seed(5)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    _, f, _ = _eot((1, 16, 16), zero_init=False, dropout=0, **TINY)
    assert (f(x, 0.2) - f(x, 0.7)).abs().mean() > 1e-3
    # Default zero init: f is 0 for every t. The first optimiser step moves only the output conv (the
    # zero-initialised block convs get zero gradients through it), so f still ignores t; after the
    # second step it depends on t.
    _, f, _ = _eot((1, 16, 16), dropout=0, **TINY)
    assert torch.equal(f(x, 0.2), torch.zeros_like(x)) and torch.equal(f(x, 0.7), torch.zeros_like(x))
    opt = torch.optim.Adam(f.parameters(), lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        ((f(x, torch.rand(4)) - x.flip(0)) ** 2).mean().backward()
        opt.step()
        diff = (f(x, 0.2) - f(x, 0.7)).abs().mean()
        assert (diff == 0) if step == 0 else (diff > 1e-4), (step, diff)
    _, fv, _ = _eot((2,), 4, zero_init=False)
    xv = torch.randn(5, 2)
    assert (fv(xv, 0.1) - fv(xv, 0.9)).abs().mean() > 1e-3
    den = _build(networks.denoiser_kwargs((2,), 'edm', 4, zero_init=False))
    # Same input to the backbone at two noise levels: only c_noise differs.
    assert (den.model(xv, torch.full([5], -1.0)) - den.model(xv, torch.full([5], 1.0))).abs().mean() > 1e-3


def test_seeded_construction_is_deterministic():
    def state(seed):
        torch.manual_seed(seed)
        nets = [*_eot((3, 16, 16), **TINY), *_eot((3,), 4),
                _build(networks.denoiser_kwargs((3, 16, 16), 've', 8, num_blocks=1))] # 've': random Fourier buffer.
        return [t for n in nets for t in n.state_dict().values()]

    a, b, c = state(10), state(10), state(11)
    assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    assert any(not torch.equal(u, v) for u, v in zip(a, c))

#----------------------------------------------------------------------------
# Preconditioning (Karras et al. 2022, Table 1), re-derived here in float64 numpy.

SIGMAS = np.array([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 80.0, 150.0])


def _paper_coefficients(kind, s, sd=0.5, beta_d=19.9, beta_min=0.1, M=1000):
    if kind == 'edm':
        return sd**2 / (s**2 + sd**2), s * sd / np.sqrt(sd**2 + s**2), 1 / np.sqrt(s**2 + sd**2), 0.25 * np.log(s)
    if kind == 've':
        return np.ones_like(s), s, np.ones_like(s), np.log(0.5 * s)
    # VP: c_noise = (M - 1) sigma^-1(s), with sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) inverted
    # by root finding instead of the closed form the code uses.
    t = [scipy.optimize.brentq(lambda u: np.sqrt(np.expm1(0.5 * beta_d * u**2 + beta_min * u)) - si, 0, 3,
                               xtol=1e-15, rtol=1e-14) for si in s]
    return np.ones_like(s), -s, 1 / np.sqrt(s**2 + 1), (M - 1) * np.array(t)


@pytest.mark.parametrize('kind', ['edm', 'vp', 've'])
def test_precond_coefficients_match_paper(kind):
    got = networks.precond_coefficients(kind, torch.tensor(SIGMAS, dtype=torch.float64))
    for g, e, name in zip(got, _paper_coefficients(kind, SIGMAS), ['c_skip', 'c_out', 'c_in', 'c_noise']):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-9, atol=1e-12, err_msg=f'{kind} {name}')
    got32 = networks.precond_coefficients(kind, torch.tensor(SIGMAS, dtype=torch.float32))
    assert all(c.dtype == torch.float32 and c.shape == (len(SIGMAS),) for c in got32)


@pytest.mark.parametrize('sigma_data', [0.5, 1.0])
def test_edm_unit_variance(sigma_data):
    s = torch.tensor(SIGMAS, dtype=torch.float64)
    c_skip, c_out, c_in, _ = networks.precond_coefficients('edm', s, sigma_data)
    # Network input has unit variance: c_in^2 (sigma^2 + sigma_data^2) = 1.
    torch.testing.assert_close(c_in**2 * (s**2 + sigma_data**2), torch.ones_like(s))
    # Training target F = (y - c_skip (y + n)) / c_out has unit variance (Karras et al. eq. 8, 138-140).
    var = ((1 - c_skip)**2 * sigma_data**2 + c_skip**2 * s**2) / c_out**2
    torch.testing.assert_close(var, torch.ones_like(s))
    # ... and by Monte Carlo, with y ~ N(0, sigma_data^2) and n ~ N(0, sigma^2).
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(200000, 1, generator=gen, dtype=torch.float64) * sigma_data
    n = torch.randn(200000, 1, generator=gen, dtype=torch.float64) * s
    target = (y - c_skip * (y + n)) / c_out
    torch.testing.assert_close(target.var(0), torch.ones_like(s), rtol=0.02, atol=0)


def test_vp_sigma_roundtrip_and_denoiser_defaults():
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(networks.vp_sigma_inv(networks.vp_sigma(t)), t)
    expect = dict(edm=(0.002, 80.0), ve=(0.02, 100.0),
                  vp=(math.sqrt(math.expm1(0.5 * 19.9e-10 + 0.1e-5)), math.sqrt(math.expm1(0.5 * 19.9 + 0.1))))
    for kind, (lo, hi) in expect.items():
        den = networks.Denoiser((2,), kind, 4)
        assert den.sigma_min == pytest.approx(lo, rel=1e-9) and den.sigma_max == pytest.approx(hi, rel=1e-9)
        assert den.sigma_data == 0.5 and torch.equal(den.round_sigma(0.7), torch.tensor(0.7))
        assert den.label_dim == 0 and den(torch.zeros(2, 2), 1.0, None).shape == (2, 2)
        with pytest.raises(ValueError, match='unconditional'):
            den(torch.zeros(2, 2), 1.0, torch.zeros(2, 3))


@pytest.mark.parametrize('kind', ['edm', 'vp', 've'])
def test_denoiser_forward_is_preconditioned_backbone(kind):
    torch.manual_seed(6)
    den = networks.Denoiser((1, 8, 8), kind, 8, num_blocks=1, dropout=0, zero_init=False)
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    e = [torch.tensor(c, dtype=torch.float32).reshape(3, 1, 1, 1)
         for c in _paper_coefficients(kind, sigma.double().numpy())]
    expected = e[0] * x + e[1] * den.model(e[2] * x, e[3].flatten())
    torch.testing.assert_close(den(x, sigma), expected, rtol=1e-4, atol=1e-4)
    # Zero-initialised output layer: the untrained denoiser is exactly c_skip x.
    torch.manual_seed(6)
    den0 = networks.Denoiser((1, 8, 8), kind, 8, num_blocks=1)
    torch.testing.assert_close(den0(x, sigma), e[0] * x)

#----------------------------------------------------------------------------
# Building blocks against brute force.

def test_group_count_brute_force():
    for ch in range(1, 300):
        limit = max(1, min(32, ch // 4))
        assert networks.group_count(ch) == max(g for g in range(1, limit + 1) if ch % g == 0)


def test_resample_box_and_fir():
    torch.manual_seed(7)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(networks.Resample(3, 'down', [1, 1])(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(networks.Resample(3, 'up', [1, 1])(x), F.interpolate(x, scale_factor=2, mode='nearest'))
    # [1,3,3,1] downsampling: out[i, j] = sum_ab k_a k_b xpad[2i + a, 2j + b], zero padding 1, k = [1,3,3,1] / 8.
    k = np.array([1, 3, 3, 1]) / 8
    xp = np.pad(x.numpy(), [(0, 0), (0, 0), (1, 1), (1, 1)])
    ref = np.zeros((2, 3, 4, 4))
    for i in range(4):
        for j in range(4):
            for a in range(4):
                for b in range(4):
                    ref[:, :, i, j] += k[a] * k[b] * xp[:, :, 2 * i + a, 2 * j + b]
    np.testing.assert_allclose(networks.Resample(3, 'down', [1, 3, 3, 1])(x).numpy(), ref, rtol=1e-5, atol=1e-6)
    # Upsampling is the adjoint of downsampling times 4 (transposed convolution): <up(y), x> = 4 <y, down(x)>.
    y = torch.randn(2, 3, 4, 4)
    for filt in ([1, 1], [1, 3, 3, 1], [1, 2, 1]):
        up, down = networks.Resample(3, 'up', filt), networks.Resample(3, 'down', filt)
        assert up(y).shape == (2, 3, 8, 8)
        torch.testing.assert_close((up(y) * x).sum(), 4 * (y * down(x)).sum(), rtol=1e-5, atol=1e-5)
    # Constant images stay constant away from the border.
    c = networks.Resample(3, 'up', [1, 3, 3, 1])(torch.ones(1, 3, 4, 4))
    torch.testing.assert_close(c[..., 1:-1, 1:-1], torch.ones(1, 3, 6, 6))


def test_attention_and_embedding_against_formulas():
    torch.manual_seed(8)
    block = networks.ResBlock(128, 128, attention=True, zero_init=False)
    y = torch.randn(2, 128, 4, 4)
    qkv = block.qkv(y).reshape(2, 3, 2, 64, 16)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                        # [N, heads, d, HW]
    w = torch.softmax(torch.einsum('nhdi,nhdj->nhij', q, k) / 8.0, dim=-1)
    ref = block.proj(torch.einsum('nhij,nhdj->nhdi', w, v).reshape(2, 128, 4, 4))
    torch.testing.assert_close(block._attention(y), ref, rtol=1e-4, atol=1e-5)
    emb = networks.TimeEmbedding(8, 'positional')
    t = torch.tensor([0.0, 3.0, 500.0])
    f = 1e-4 ** (np.arange(4) / 4)
    ref = np.concatenate([np.cos(t.numpy()[:, None] * f), np.sin(t.numpy()[:, None] * f)], 1)
    np.testing.assert_allclose(emb(t).numpy(), ref, rtol=1e-5, atol=1e-5)

#----------------------------------------------------------------------------
# Summaries.

def test_summary_total_matches_parameter_count(capsys):
    torch.manual_seed(9)
    G, f, D = _eot((3, 16, 16), **TINY)
    den = networks.Denoiser((3,), 'edm', 16)
    x = torch.zeros(2, 3, 16, 16)
    for net, inputs in [(G, [x]), (f, [x, torch.zeros(2)]), (D, [x]), (den, [torch.zeros(2, 3), torch.ones(2)])]:
        misc.print_module_summary(net, inputs)
        text = capsys.readouterr().out
        total = int(re.search(r'^Total\s+(\d+)', text, re.M).group(1))
        assert total == sum(p.numel() for p in net.parameters()) > 0

#----------------------------------------------------------------------------
# Snapshots that load in a fresh process, with and without models/networks.py.

LOAD_CODE = textwrap.dedent('''
    import pickle, sys, torch
    torch.set_num_threads(int(sys.argv[2]))
    with open(sys.argv[1], 'rb') as f:
        snap = pickle.load(f)
    nets = snap['nets']
    for name, net in nets.items():
        assert type(net).__module__.startswith('_persistent_module_'), (name, type(net).__module__)
        assert net.init_kwargs == snap['init_kwargs'][name], name
    assert nets['G'].z_shape == (1, 16, 16) and nets['Gv'].z_shape == (3,)
    with torch.no_grad():
        for key, (name, args) in snap['calls'].items():
            out = nets[name](*args)
            assert torch.equal(out, snap['expected'][key]), (key, (out - snap['expected'][key]).abs().max())
    print('OK', len(snap['calls']))
''')


def test_snapshot_loads_without_the_code(tmp_path):
    torch.manual_seed(12)
    G, f, D = _eot((3, 16, 16), zero_init=False, attn_resolutions=[8], **TINY)
    Gv, fv, Dv = _eot((3,), 4, zero_init=False)
    den = networks.Denoiser((1, 8, 8), 've', 8, num_blocks=1, zero_init=False)
    nets = dict(G=G, f=f, D=D, Gv=Gv, fv=fv, Dv=Dv, den=den)
    for net in nets.values():
        net.eval()
        assert persistence.is_persistent(net)
    x, xv, xd = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3), torch.randn(2, 1, 8, 8)
    calls = dict(G=('G', (x, torch.randn(2, 1, 16, 16))), f=('f', (x, 0.4)), D=('D', (x,)),
                 Gv=('Gv', (xv, torch.randn(2, 3))), fv=('fv', (xv, torch.tensor([0.1, 0.9]))), Dv=('Dv', (xv,)),
                 den=('den', (xd, torch.tensor([0.5, 5.0]))))
    with torch.no_grad():
        expected = {k: nets[n](*a) for k, (n, a) in calls.items()}
        # deepcopy (the training loop's EMA copies) goes through the same reduce path.
        for k, (n, a) in calls.items():
            twin = copy.deepcopy(nets[n])
            assert type(twin) is type(nets[n]) and torch.equal(twin(*a), expected[k])
    assert all(e.abs().sum() > 0 for e in expected.values())
    pkl = tmp_path / 'snapshot.pkl'
    with open(pkl, 'wb') as fp:
        pickle.dump(dict(nets=nets, calls=calls, expected=expected,
                         init_kwargs={k: n.init_kwargs for k, n in nets.items()}), fp)

    def run(cwd, pythonpath):
        env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS=str(torch.get_num_threads()))
        res = subprocess.run([sys.executable, '-c', LOAD_CODE, str(pkl), str(torch.get_num_threads())], cwd=cwd,
                             env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and 'OK 7' in res.stdout, res.stdout + res.stderr

    clean = tmp_path / 'clean'
    clean.mkdir()
    run(clean, REPO)
    # A tree holding only torch_utils and dnnlib: models/networks.py is gone.
    bare = tmp_path / 'bare'
    for pkg in ('torch_utils', 'dnnlib'):
        shutil.copytree(os.path.join(REPO, pkg), bare / pkg, ignore=shutil.ignore_patterns('__pycache__'))
    assert not (bare / 'training').exists()
    run(bare, str(bare))
