"""sampling.dpmot: potential files, the OT map (top-1, top-k with the dihedral-angle rule) and generate_samples,
checked against brute-force re-implementations and closed forms."""

import math

import numpy as np
import pytest
import torch
from sampling import diffusion
from sampling import dpmot
from torch_utils import misc
from sampling import potential as potential_lib
from transport.semidiscrete import SemidiscreteProblem


class IdealGaussianDenoiser(torch.nn.Module):
    """D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu): the exact denoiser of N(mu, s^2 I)."""

    def __init__(self, mu, s):
        super().__init__()
        self.register_buffer('mu', torch.as_tensor(mu, dtype=torch.float64))
        self.s, self.sigma_min, self.sigma_max = float(s), 0.002, 80.0
        self.data_shape = tuple(self.mu.shape)

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)


class EDMInterfaceNet(torch.nn.Module):
    """Only what NVlabs/edm's EDMPrecond offers: net(x, sigma), img_resolution, img_channels, sigma_min,
    sigma_max, round_sigma (no data_shape). A fixed linear 'denoiser' of images."""

    def __init__(self):
        super().__init__()
        self.img_resolution, self.img_channels, self.sigma_min, self.sigma_max, self.sigma_data = 4, 3, 0.002, 80, 0.5
        self.conv = torch.nn.Conv2d(3, 3, 1)
        torch.nn.init.eye_(self.conv.weight[:, :, 0, 0])
        torch.nn.init.zeros_(self.conv.bias)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        return self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2) * self.conv(x)


def exact_1d_heights(y, source='uniform'):
    """Closed-form semi-discrete OT heights for 1-D targets: with the targets sorted, cell i must be the i-th
    quantile interval of the source, so the boundary of cells i and i+1 sits at q_(i+1) = F^-1((i+1) / N), where
    x y_i + h_i = x y_(i+1) + h_(i+1): h_(i+1) = h_i - q_(i+1) (y_(i+1) - y_i)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    N, order = len(y), np.argsort(y)
    q = np.arange(1, N) / N
    if source == 'normal':
        from scipy.stats import norm
        q = norm.ppf(q)
    h_sorted = np.concatenate([[0.0], -np.cumsum(q * np.diff(y[order]))])
    h = np.empty(N)
    h[order] = h_sorted
    return torch.as_tensor(h)


def _potential(tmp_path, targets, h, sigmas, back_steps, source='uniform', net=None, name='potential.pt', **kw):
    """Write and read back a potential file for targets [N, *shape] with heights h."""
    N = targets.shape[0]
    prob = SemidiscreteProblem(targets=targets.reshape(N, -1).to(torch.float32), source=source)
    gap = potential_lib.mean_score_gap(prob, h)
    path = potential_lib.save_potential(tmp_path / name, h=h, sigmas=sigmas, back_steps=back_steps, source=source,
                                data_shape=list(targets.shape[1:]), score_gap=gap, targets=targets,
                                solver=dict(converged=True), provenance=dict(
                                    denoiser_sha256=misc.state_dict_sha256(net) if net is not None else None,
                                    data_sha256='ab' * 32), **kw)
    return potential_lib.load_potential(path)


@pytest.fixture
def toy(tmp_path):
    """Eight 2-D targets with arbitrary heights (the map's rules hold for any h), an 8-step schedule with K = 3,
    and the ideal denoiser of N(0, 1)."""
    net = IdealGaussianDenoiser([0.0, 0.0], 1.0)
    gen = torch.Generator().manual_seed(5)
    targets = torch.randn(8, 2, generator=gen)
    h = 0.3 * torch.randn(8, generator=gen, dtype=torch.float64)
    pot = _potential(tmp_path, targets, h, diffusion.edm_sigma_schedule(8), 3, net=net)
    return net, pot


#----------------------------------------------------------------------------
# Files.

@pytest.mark.parametrize('separate', [False, True])
def test_potential_file_round_trip(tmp_path, toy, separate):
    net, pot = toy
    tpath = tmp_path / 'targets.pt' if separate else None
    path = potential_lib.save_potential(tmp_path / 'p2.pt', h=pot['h'], sigmas=pot['sigmas'], back_steps=3, source='uniform',
                                data_shape=[2], score_gap=pot['score_gap'], targets=pot['targets'], targets_path=tpath,
                                indices=np.arange(8), solver=dict(converged=True, history=[dict(iter=1, rms=0.5)]),
                                provenance=dict(seed=0))
    raw = torch.load(path, weights_only=True)
    assert (raw['targets'] is None) == separate and raw['sigma'] == pytest.approx(float(pot['sigmas'][5]))
    back = potential_lib.load_potential(path)
    assert torch.equal(back['h'], pot['h']) and torch.equal(back['targets'], pot['targets'])
    assert back['num_steps'] == 8 and back['back_steps'] == 3 and back['indices'].tolist() == list(range(8))
    assert back['solver']['history'][0]['rms'] == 0.5
    if separate:
        assert raw['targets_path'] == 'targets.pt'
        torch.save(pot['targets'] + 1, tpath)             # a replaced latents file is caught
        with pytest.raises(potential_lib.PotentialError, match='do not match the hash'):
            potential_lib.load_potential(path)
        tpath.unlink()
        with pytest.raises(potential_lib.PotentialError, match='does not exist'):
            potential_lib.load_potential(path)


def test_foreign_or_damaged_files_are_refused(tmp_path, toy):
    _, pot = toy
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    torch.save(dict(a=1), tmp_path / 'other.pt')
    damaged = dict(pot, h=None)
    torch.save(damaged, tmp_path / 'damaged.pt')
    for name, expect in (('junk.pt', 'not a readable'), ('other.pt', 'not a DPM-OT potential'),
                         ('damaged.pt', '"h" should be'), ('absent.pt', 'No such potential')):
        with pytest.raises(potential_lib.PotentialError, match=expect):
            potential_lib.load_potential(tmp_path / name)
    with pytest.raises(TypeError, match='weights_only'):
        potential_lib.save_potential(tmp_path / 'x.pt', h=pot['h'], sigmas=pot['sigmas'], back_steps=3, source='uniform',
                             data_shape=[2], score_gap=1.0, targets=pot['targets'], provenance=dict(when=object()))
    assert not (tmp_path / 'x.pt').exists()


def test_mismatches_are_caught(toy):
    net, pot = toy
    other = IdealGaussianDenoiser([0.0, 0.1], 1.0)
    with pytest.raises(potential_lib.PotentialError, match='another denoiser'):
        dpmot.generate_samples(other, [0], pot)
    dpmot.generate_samples(other, [0], pot, check_network=False)
    with pytest.raises(potential_lib.PotentialError, match='shape'):
        dpmot.generate_samples(IdealGaussianDenoiser([0.0, 0.0, 0.0], 1.0), [0], pot)
    with pytest.raises(potential_lib.PotentialError, match='another data set'):
        potential_lib.check_potential(pot, data_hash='cd' * 32)
    potential_lib.check_potential(pot, net=net, data_hash='ab' * 32, data_shape=[2])
    with pytest.raises(ValueError, match='--steps=12'):
        dpmot.generate_samples(net, [0], pot, steps=12)
    with pytest.raises(ValueError, match='topk'):
        dpmot.generate_samples(net, [0], pot, topk=9)
    with pytest.raises(ValueError, match=r'seeds are integers in \[-2\^63, 2\^64\)'):
        dpmot.generate_samples(net, [0.5], pot)
    with pytest.raises(ValueError, match='Unknown sampler'):
        dpmot.generate_samples(net, [0], pot, sampler='ddim')

#----------------------------------------------------------------------------
# The OT map against brute force.

def _source_points(seeds, d):
    """The documented draw: the first numbers of torch.Generator().manual_seed(seed) are u ~ U[0,1]^d (float32)."""
    return torch.stack([torch.rand([d], generator=torch.Generator().manual_seed(s)) for s in seeds])


def test_top1_starts_from_the_argmax_cell_and_runs_the_last_k_steps(toy):
    net, pot = toy
    seeds = list(range(20, 45))
    x, info = dpmot.generate_samples(net, seeds, pot, sampler='heun', batch_size=7, return_latents=True)
    u = _source_points(seeds, 2).double().numpy()
    scores = u @ pot['targets'].double().numpy().T + pot['h'].numpy()      # brute force over every cell
    best = scores.argmax(1)
    assert info['cells'].tolist() == best.tolist()
    np.testing.assert_array_equal(info['latents'].numpy(), pot['targets'].numpy()[best])
    tail = pot['sigmas'][5:]
    assert info['sigma_start'] == float(tail[0]) and info['nfe'] == info['nfe_formula'] == 2 * 3 - 1
    expect = diffusion.sample_heun(net, pot['targets'][best].double(), tail)
    np.testing.assert_allclose(x.numpy(), expect.numpy(), rtol=1e-6, atol=1e-6)


def _topk_reference(u, Y, h, k, T, threshold, norm, angle_range=None):
    """numpy re-implementation: top-k scores, angles of the normals (y, -1), kept pairs, softmax weights."""
    scores = u @ Y.T + h
    idx = np.argsort(-scores, axis=1, kind='stable')[:, :k]
    normals = np.concatenate([Y, -np.ones((len(Y), 1))], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    theta = np.stack([[math.acos(min(1.0, max(-1.0, normals[r[0]] @ normals[j]))) for j in r] for r in idx])
    if norm == 'minmax':
        lo, hi = angle_range
        theta = (theta - lo) / (hi - lo)
    keep = theta <= threshold
    keep[:, 0] = True
    s = np.take_along_axis(scores, idx, 1)
    w = np.where(keep, np.exp((s - s[:, :1]) / T), 0.0)
    w /= w.sum(1, keepdims=True)
    return (w[:, :, None] * Y[idx]).sum(1), w, idx


@pytest.mark.parametrize('norm, threshold', [('none', None), ('minmax', 0.7)])
def test_topk_latents_match_a_numpy_reimplementation(toy, norm, threshold):
    net, pot = toy
    seeds, k, temp = list(range(200)), 3, 2.0
    if threshold is None:  # raw angles (radians): cut at the median angle of the reference batch
        threshold = float(np.median(dpmot.OTMap(pot, 'cpu', topk=k).angle_range))
    ot = dpmot.OTMap(pot, 'cpu', topk=k, temperature=temp, angle_threshold=threshold, angle_norm=norm, renoise=False)
    u = _source_points(seeds, 2)
    latents, info = ot(u)
    Y, h = pot['targets'].double().numpy(), pot['h'].numpy()
    ref, w, idx = _topk_reference(u.double().numpy(), Y, h, k, temp * pot['score_gap'], threshold, norm, ot.angle_range)
    np.testing.assert_array_equal(info['topk_cells'].numpy(), idx)
    np.testing.assert_allclose(info['weights'].numpy(), w, atol=1e-6)
    np.testing.assert_allclose(latents.numpy(), ref, atol=1e-5)
    assert 0 < info['kept_pairs'] < 1                      # the rule keeps some pairs and cuts others
    if norm == 'minmax':                                   # the range comes from a fixed reference batch
        ref_u = torch.rand([1024, 2], generator=torch.Generator().manual_seed(dpmot._ANGLE_REF_SEED)).double().numpy()
        ref_idx = np.argsort(-(ref_u @ Y.T + h), axis=1, kind='stable')[:, :k]
        nm = np.concatenate([Y, -np.ones((8, 1))], 1)
        nm /= np.linalg.norm(nm, axis=1, keepdims=True)
        th = np.arccos(np.clip(np.einsum('md,mkd->mk', nm[ref_idx[:, 0]], nm[ref_idx[:, 1:]]), -1, 1))
        assert ot.angle_range == pytest.approx((th.min(), th.max()), abs=1e-9)


def test_topk_limits_and_renoise(toy):
    net, pot = toy
    seeds = list(range(50))
    top1 = dpmot.generate_samples(net, seeds, pot, return_latents=True)[1]['latents']
    # Threshold 0 on raw angles keeps only the best cell: top-1.
    cut = dpmot.generate_samples(net, seeds, pot, topk=4, angle_norm='none', angle_threshold=0.0, renoise=False,
                                 return_latents=True)[1]['latents']
    torch.testing.assert_close(cut, top1)
    # Every pair kept and a huge temperature: the plain mean of the 4 best latents.
    flat = dpmot.OTMap(pot, 'cpu', topk=4, temperature=1e9, angle_norm='none', angle_threshold=4.0, renoise=False)
    u = _source_points(seeds, 2)
    lat, info = flat(u)
    torch.testing.assert_close(lat, pot['targets'][info['topk_cells']].mean(1), atol=1e-6, rtol=1e-6)
    # Renoise adds sigma sqrt(1 - sum w^2) n, n the next draws of each seed's generator after u.
    x, info2 = dpmot.generate_samples(net, seeds, pot, topk=4, temperature=1e9, angle_norm='none',
                                      angle_threshold=4.0, return_latents=True)
    def after_u(seed):
        g = torch.Generator().manual_seed(seed)
        torch.rand([2], generator=g)
        return torch.randn([2], generator=g)
    n = torch.stack([after_u(s) for s in seeds])
    expect = lat + pot['sigma'] * math.sqrt(1 - 4 * 0.25 ** 2) * n
    torch.testing.assert_close(info2['latents'], expect, atol=1e-5, rtol=1e-5)

#----------------------------------------------------------------------------
# Generation.

@pytest.mark.parametrize('use_pot, sampler, opts', [
    (False, 'heun', dict(S_churn=30, S_min=0.01, S_max=50)), (False, 'langevin', {}),
    (True, 'euler', dict(S_churn=10)), (True, 'langevin', dict(n_steps_each=2)), ('topk', 'heun', {})])
def test_same_seed_same_sample_whatever_the_batch(toy, use_pot, sampler, opts):
    net, pot = toy
    kw = dict(potential=pot if use_pot else None, sampler=sampler, steps=None if use_pot else 6, **opts)
    if use_pot == 'topk':
        kw.update(topk=3)
    seeds = list(range(100, 111))
    full, _ = dpmot.generate_samples(net, seeds, batch_size=64, **kw)
    for bs in (1, 4):
        assert torch.equal(dpmot.generate_samples(net, seeds, batch_size=bs, **kw)[0], full)
    part, _ = dpmot.generate_samples(net, seeds[3:7][::-1], **kw)          # other seeds, other order
    assert torch.equal(part, full[3:7].flip(0))
    assert not torch.equal(full[0], full[1])


@pytest.mark.parametrize('sampler, nfe', [('euler', 3), ('heun', 5), ('langevin', 4)])
def test_nfe_with_a_potential_counts_the_last_k_steps(toy, sampler, nfe):
    net, pot = toy
    _, info = dpmot.generate_samples(net, range(3), pot, sampler=sampler)
    assert info['nfe'] == info['nfe_formula'] == nfe and info['back_steps'] == 3


@pytest.mark.parametrize('source', ['uniform', 'normal'])
def test_every_cell_gets_its_share_of_seeds(tmp_path, source):
    # With exact 1-D heights the OT map is the quantile map: seeds spread evenly, counts ~ Multinomial(M, 1/N).
    net = IdealGaussianDenoiser([0.0], 1.0)
    targets = torch.randn(10, 1, generator=torch.Generator().manual_seed(2))
    pot = _potential(tmp_path, targets, exact_1d_heights(targets, source), diffusion.edm_sigma_schedule(6), 2,
                     source=source, net=net)
    M = 5000
    _, info = dpmot.generate_samples(net, range(M), pot, sampler='euler', batch_size=1000, return_latents=True)
    counts = torch.bincount(info['cells'], minlength=10).double()
    chi2 = float(((counts - M / 10) ** 2 / (M / 10)).sum())
    assert chi2 < 30, counts.tolist()        # 9 degrees of freedom: p < 0.001 beyond 27.9
    # Brute force: the cell of u is the rank of its quantile.
    if source == 'normal':   # the documented draw: u ~ N(0, 1) from the seed's generator
        z = torch.stack([torch.randn([1], generator=torch.Generator().manual_seed(s)) for s in range(M)])[:, 0]
        rank = torch.distributions.Normal(0.0, 1.0).cdf(z.double())
    else:
        rank = _source_points(range(M), 1)[:, 0].double()
    order = torch.argsort(targets[:, 0])
    expect = order[(rank * 10).floor().long().clamp(max=9)]
    assert (info['cells'] == expect).float().mean() > 0.999   # up to float ties at the boundaries


def test_dpmot_with_the_ideal_denoiser_reproduces_gaussian_data(tmp_path):
    # Targets y_i = x_i + sigma n_i of x_i ~ N(mu, s^2) (1-D, exact heights); the OT start plus the last K Heun
    # steps land on N(mu, s^2).
    mu, s = 2.0, 0.5
    sigmas = diffusion.edm_sigma_schedule(12)
    x = mu + s * torch.randn(2000, 1, generator=torch.Generator().manual_seed(1))
    targets = potential_lib.forward_diffuse(x, float(sigmas[8]), seed=3)
    net = IdealGaussianDenoiser([mu], s)
    pot = _potential(tmp_path, targets, exact_1d_heights(targets), sigmas, 4, net=net)
    out, info = dpmot.generate_samples(net, range(4000), pot, sampler='heun', batch_size=1000)
    assert info['nfe'] == 7
    assert float(out.mean()) == pytest.approx(mu, abs=0.04)
    assert float(out.std()) == pytest.approx(s, rel=0.05)


def test_a_net_with_only_edms_interface(tmp_path):
    net = EDMInterfaceNet()
    x, info = dpmot.generate_samples(net, [0, 1], sampler='euler', steps=3)
    assert x.shape == (2, 3, 4, 4) and info['nfe'] == 3 and torch.isfinite(x).all()
    targets = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    h = 0.1 * torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pot = _potential(tmp_path, targets, h, diffusion.net_sigma_schedule(net, 6), 2, net=net)
    x, info = dpmot.generate_samples(net, range(5), pot, sampler='heun', topk=2)
    assert x.shape == (5, 3, 4, 4) and info['nfe'] == 3 and torch.isfinite(x).all()


def test_forward_diffuse_is_the_documented_draw():
    x = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    y = potential_lib.forward_diffuse(x, 0.5, seed=7)
    torch.testing.assert_close(y, x + 0.5 * torch.randn([3, 2], generator=torch.Generator().manual_seed(7)))
    assert potential_lib.select_indices(10, 10, 0).tolist() == list(range(10))
    idx = potential_lib.select_indices(10, 4, 3)
    assert idx.tolist() == sorted(np.random.default_rng(3).permutation(10)[:4].tolist())
    with pytest.raises(ValueError, match='num_targets=11'):
        potential_lib.select_indices(10, 11, 0)


def test_the_potential_is_checked_and_the_network_hashed_once_per_call(toy, monkeypatch):
    net, pot = toy
    calls = dict(check=0, hash=0)
    check, sha = dpmot.check_potential, potential_lib.state_dict_sha256

    def counting_check(*args, **kwargs):
        calls['check'] += 1
        return check(*args, **kwargs)

    def counting_sha(*args, **kwargs):
        calls['hash'] += 1
        return sha(*args, **kwargs)

    monkeypatch.setattr(dpmot, 'check_potential', counting_check)
    monkeypatch.setattr(potential_lib, 'state_dict_sha256', counting_sha)
    x, info = dpmot.generate_samples(net, range(12), pot, batch_size=2)   # six batches
    assert calls == dict(check=1, hash=1) and x.shape == (12, 2)
    prepared = dpmot.PreparedSampler(net, pot)
    parts = [prepared.sample(range(i, i + 3))[0] for i in (0, 3, 6, 9)]
    assert calls == dict(check=2, hash=2)
    assert torch.equal(torch.cat(parts), x)                             # the same samples, batch by batch


def test_a_sample_drawn_from_cell_i_is_denoised_with_label_y_i(tmp_path):
    from tests.sampling.edm_standin import EDMStandIn, potential_for
    net = EDMStandIn(img_resolution=4, label_dim=3, seed=2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    pot = potential_lib.load_potential(potential_for(tmp_path / 'p.pt', net, labels=labels))
    x, info = dpmot.generate_samples(net, range(24), pot, sampler='heun', batch_size=5, return_latents=True)
    assert torch.equal(info['labels'], labels[info['cells']]) and len(set(info['cells'].tolist())) >= 4
    tail = pot['sigmas'][pot['num_steps'] - pot['back_steps']:]
    for i in range(24):            # brute force: each latent through the sampler with its cell's one-hot label
        one_hot = torch.nn.functional.one_hot(labels[info['cells'][i]], 3).float()[None]
        expect = diffusion.sample_heun(lambda z, s: net(z, s, one_hot), info['latents'][i:i + 1].double(), tail)
        torch.testing.assert_close(x[i:i + 1], expect.float(), rtol=1e-5, atol=1e-5)
        other = torch.nn.functional.one_hot((labels[info['cells'][i]] + 1) % 3, 3).float()[None]
        assert not torch.allclose(x[i:i + 1], diffusion.sample_heun(lambda z, s: net(z, s, other),
                                                                     info['latents'][i:i + 1].double(), tail).float())
    # A potential of one class: every sample takes it; another class is refused; unconditional nets ignore labels.
    pot2 = potential_lib.load_potential(potential_for(tmp_path / 'p2.pt', net, class_label=2))
    assert dpmot.generate_samples(net, range(4), pot2, class_label=2)[1]['labels'].tolist() == [2] * 4
    with pytest.raises(potential_lib.PotentialError, match='made for class 2'):
        dpmot.generate_samples(net, range(4), pot2, class_label=1)
    plain = EDMStandIn(img_resolution=4, seed=2)
    pot3 = potential_lib.load_potential(potential_for(tmp_path / 'p3.pt', plain, labels=labels))
    assert 'labels' not in dpmot.generate_samples(plain, range(4), pot3)[1]
