"""The one-step EOT method: losses against their formulas, the SDE sampler against the exact
Euler-Maruyama moments, the optimisation phase against plain autograd, and the task's graph hygiene."""

import math

import numpy as np
import pytest
import torch

import dnnlib
from models import eot_loss
from training import eot_task
from sampling import translation
from training.trainer import Trainer
from torch_utils import training_stats


def test_bridge_moments_match_closed_form():
    loss = eot_loss.EOTLoss(gamma=2.0)
    n = 200_000
    x0, xN = torch.full([n, 1], -1.0), torch.full([n, 1], 3.0)
    t = torch.full([n], 0.3)
    g = torch.Generator().manual_seed(0)
    xt = loss.bridge(x0, xN, t, torch.randn(n, 1, generator=g))
    assert abs(xt.mean().item() - (-1 + 0.3 * 4)) < 0.01
    assert abs(xt.var().item() - 2.0 * 0.3 * 0.7) < 0.01
    assert torch.equal(loss.bridge(x0, xN, torch.zeros(n), torch.randn(n, 1)), x0)
    assert torch.equal(loss.bridge(x0, xN, torch.ones(n), torch.randn(n, 1)), xN)
    with pytest.raises(ValueError, match='gamma'):
        eot_loss.EOTLoss(gamma=-1)


class Affine(torch.nn.Module):
    def __init__(self, dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, x, t=None):
        out = x @ self.w + self.b
        return out if t is None else out * (1 + t[:, None])


def test_losses_match_the_formulas():
    torch.manual_seed(0)
    n, d = 16, 5
    f, D_lin = Affine(d, 1), torch.nn.Linear(d, 1)
    D = lambda x: D_lin(x).squeeze(1)
    x0, xN, x1 = torch.randn(n, d), torch.randn(n, d), torch.randn(n, d)
    t, noise = torch.rand(n), torch.randn(n, d)
    loss = eot_loss.EOTLoss(gamma=0.7)
    xt = x0 + t[:, None] * (xN - x0) + torch.sqrt(0.7 * t * (1 - t))[:, None] * noise
    # docs/architecture.md, written with whole-batch means.
    f_ref = ((f(xt, t) - xN) ** 2).mean()
    drift = f(xt, t) - xt
    G_ref = 2 * ((drift * (xN - xt)).mean() - (drift ** 2).mean() / 2) - D(xN).mean()
    D_ref = D(xN).mean() - D(x1).mean()
    assert torch.allclose(loss.f_loss(f, x0, xN, t, noise).mean(), f_ref, atol=1e-6)
    G_loss, transport = loss.G_loss(f, D, x0, xN, t, noise)
    assert G_loss.shape == (n,) and torch.allclose(G_loss.mean(), G_ref, atol=1e-6)
    assert torch.allclose(transport.mean(), G_ref + D(xN).mean(), atol=1e-6)
    assert torch.allclose(loss.D_loss(D, xN, x1).mean(), D_ref, atol=1e-6)


def test_gradient_penalty_matches_closed_form_and_finite_differences():
    torch.manual_seed(0)
    n, d = 12, 5
    xN, x1, alpha = torch.randn(n, d), torch.randn(n, d), torch.rand(n)
    loss = eot_loss.EOTLoss(gamma=0.5)
    # Linear critic: grad D = w everywhere, so the penalty is (|w| - 1)^2 for every sample.
    D_lin = torch.nn.Linear(d, 1)
    D = lambda x: D_lin(x).squeeze(1)
    plain = loss.D_loss(D, xN, x1)
    with_gp = loss.D_loss(D, xN, x1, gp_weight=10.0, alpha=alpha)
    want = 10 * (D_lin.weight.detach().norm() - 1) ** 2
    assert torch.allclose(with_gp - plain, want.expand(n), atol=1e-5)
    # A non-linear critic: the input gradient against central differences at x_hat, and the penalty's own
    # gradient reaches D's parameters (double backward).
    net = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    D2 = lambda x: net(x.double()).squeeze(1)
    xN, x1, alpha = xN.double(), x1.double(), alpha.double()
    pen = (loss.D_loss(D2, xN, x1, gp_weight=1.0, alpha=alpha) - loss.D_loss(D2, xN, x1)).detach()
    x_hat = alpha[:, None] * xN + (1 - alpha[:, None]) * x1
    h, eye = 1e-6, torch.eye(d, dtype=torch.float64)
    fd = torch.stack([(D2(x_hat + h * eye[k]) - D2(x_hat - h * eye[k])) / (2 * h) for k in range(d)], dim=1)
    assert torch.allclose(pen.double(), (fd.norm(dim=1) - 1) ** 2, atol=1e-5)   # (D_loss returns float32)
    net.zero_grad()
    loss.D_loss(D2, xN, x1, gp_weight=1.0, alpha=alpha).mean().backward()
    with_pen = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    loss.D_loss(D2, xN, x1).mean().backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(with_pen, net.parameters()))
    with pytest.raises(ValueError, match='D_gp'):
        eot_task.EOTTask({}, {}, D_gp=-1)


def test_penalty_pass_of_its_own_gives_the_joint_pass_gradients():
    """D_loss scores xN, x1 in one pass and the interpolates in another (through D_penalty); the critic's
    gradients equal those of one joint pass over all three, written out here with autograd."""
    torch.manual_seed(0)
    n, d = 6, 4
    net = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    D = lambda x: net(x).squeeze(1)
    xN, x1, alpha = torch.randn(n, d).double(), torch.randn(n, d).double(), torch.rand(n).double()
    calls = []
    D_penalty = lambda x: calls.append(len(x)) or D(x)
    loss = eot_loss.EOTLoss(gamma=0.5)
    net.zero_grad()
    loss.D_loss(D, xN, x1, gp_weight=3.0, alpha=alpha, D_penalty=D_penalty).mean().backward()
    ours = [p.grad.clone() for p in net.parameters()]
    assert calls == [n] # The interpolates alone went through D_penalty.
    net.zero_grad()
    x_hat = (alpha[:, None] * xN + (1 - alpha[:, None]) * x1).requires_grad_(True)
    scores = D(torch.cat([xN, x1, x_hat]))
    grad, = torch.autograd.grad(scores[2 * n:].sum(), x_hat, create_graph=True)
    (scores[:n] - scores[n:2 * n] + 3.0 * (grad.norm(dim=1) - 1) ** 2).mean().backward()
    for a, b in zip(ours, net.parameters()):
        assert torch.allclose(a, b.grad, rtol=1e-5, atol=1e-7) # (D_loss returns float32)


def test_kinetic_loss_weights_the_transport_term_by_brute_force():
    torch.manual_seed(0)
    n, d, gamma = 6, 3, 0.5
    f, D_lin = Affine(d, 2), torch.nn.Linear(d, 1)
    D = lambda x: D_lin(x).squeeze(1)
    x0, xN, noise = torch.randn(n, d), torch.randn(n, d), torch.randn(n, d)
    loss = eot_loss.KineticEOTLoss(gamma)
    t = loss.sample_t(torch.tensor([1.0, 0.7, 0.3, 0.1, 0.01, 0.0]))
    with torch.no_grad():
        got, transport = loss.G_loss(f, D, x0, xN, t, noise)
        for i in range(n):   # One sample at a time, coordinate by coordinate.
            ti = float(t[i])
            xt = [float(x0[i, k] + ti * (xN[i, k] - x0[i, k]) + math.sqrt(gamma * ti * (1 - ti)) * noise[i, k])
                  for k in range(d)]
            fx = f(torch.tensor([xt]), t[i:i + 1])[0].tolist()
            term = sum(2 * (fx[k] - xt[k]) * (float(xN[i, k]) - xt[k]) - (fx[k] - xt[k]) ** 2 for k in range(d)) / d
            q = 1 / (2 * math.sqrt(1 - ti))   # density of t = 1 - u^2, u ~ U(0, 1)
            weight = 1 / (1 - ti) ** 2 / q
            assert float(transport[i]) == pytest.approx(weight * term, rel=1e-4), i
            assert float(got[i]) == pytest.approx(weight * term - float(D(xN[i:i + 1])), rel=1e-4, abs=1e-5), i
    assert float(t[-1]) == pytest.approx(1 - eot_loss.KineticEOTLoss.U_MIN ** 2)   # u = 0 is clamped
    # t = 1 - u^2 has the CDF 1 - sqrt(1 - s); the stated loss keeps u and weight 1.
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    ts = torch.sort(loss.sample_t(u)).values.double()
    ecdf = torch.arange(1, len(ts) + 1, dtype=torch.float64) / len(ts)
    assert (ecdf - (1 - (1 - ts).sqrt())).abs().max() < 0.005   # Kolmogorov-Smirnov, 99.9 % ~ 1.95 / sqrt(N)
    stated = eot_loss.EOTLoss(gamma)
    assert torch.equal(stated.sample_t(u), u) and torch.equal(stated.transport_weight(u), torch.ones_like(u))


@pytest.mark.parametrize('G_loss, weight', [('stated', 'uniform'), ('kinetic', 'kinetic')])
def test_transport_term_with_the_exact_drift_is_the_bridge_objective(G_loss, weight):
    """On Gaussians, with f = E[x1 | x_t] exact, the batch mean of the G-step transport term estimates
    training.gaussian_eot.bridge_objective / D (the kinetic energy for 'kinetic'), within Monte Carlo error."""
    from transport import gaussian as ge
    from data import toy
    rng = np.random.default_rng(3)
    dim, gamma, num = 2, 0.7, 400_000
    s0, s1 = toy.random_covariance(dim, rng), toy.random_covariance(dim, rng)
    plan = ge.gaussian_eot_plan(None, s0, None, s1, gamma)
    x, y = (torch.as_tensor(a) for a in plan.sample(num, rng))
    cov0, cov1, cross = (torch.as_tensor(a) for a in (plan.cov0, plan.cov1, plan.cross))

    def exact_f(xt, t):   # E[x1 | x_t] = Cov(x1, x_t) Cov(x_t)^-1 x_t (zero means), per sample.
        t = t.double()[:, None, None]
        var_t = (1 - t) ** 2 * cov0 + t ** 2 * cov1 + t * (1 - t) * (cross + cross.T + gamma * torch.eye(dim))
        k_t = (1 - t) * cross.T + t * cov1
        return (k_t @ torch.linalg.solve(var_t, xt.double()[:, :, None]))[:, :, 0]

    loss = eot_loss.G_LOSSES[G_loss](gamma)
    gen = torch.Generator().manual_seed(1)
    t = loss.sample_t(torch.rand(num, generator=gen, dtype=torch.float64))
    _, transport = loss.G_loss(exact_f, lambda a: torch.zeros(len(a)), x, y, t,
                               torch.randn(num, dim, generator=gen, dtype=torch.float64))
    expect = float(ge.bridge_objective(cross, cov0, cov1, gamma, weight)) / dim
    error = float(transport.std()) / math.sqrt(num)
    assert abs(float(transport.mean()) - expect) < 4 * error, (float(transport.mean()), expect, error)
    assert error < 0.02 * expect   # The check has teeth: MC error well below the value.


def test_sde_lands_on_the_target_and_matches_euler_maruyama_variance():
    y = torch.tensor([[2.0, -1.0]])
    f = lambda x, t: y.expand_as(x)    # The ideal drift network for a point target.
    x0 = torch.zeros(100_000, 2)
    g = torch.Generator().manual_seed(0)
    randn_like = lambda x: torch.randn(x.shape, generator=g)
    out, traj = translation.sample_sde(f, x0, gamma=1.5, num_steps=5, randn_like=randn_like, return_trajectory=True)
    assert torch.allclose(out, y.expand_as(out)) # No noise on the last step.
    # Exact moments of the Euler-Maruyama recursion u_{k+1} = u_k (1 - t_{k+1}) / (1 - t_k) + sqrt(g dt) n.
    dt, var = 0.2, 0.0
    for k in range(4):
        var = var * ((1 - (k + 1) * dt) / (1 - k * dt)) ** 2 + 1.5 * dt
        emp = traj[k + 1].var(dim=0)
        assert torch.allclose(emp, torch.full_like(emp, var), rtol=0.03), (k, emp, var)
        mean = traj[k + 1].mean(dim=0)
        assert torch.allclose(mean, y[0] * (k + 1) * dt, atol=0.02)
    assert torch.equal(translation.sample_sde(f, x0[:3], gamma=0.0, num_steps=3), y.expand(3, 2))
    with pytest.raises(ValueError, match='num_steps'):
        translation.sample_sde(f, x0, gamma=1.0, num_steps=0)


def _trainer(batch_size, batch_gpu, **kwargs):
    return Trainer(torch.device('cpu'), batch_size=batch_size, batch_gpu=batch_gpu, **kwargs)


def test_run_phase_accumulates_clips_and_counts_nonfinite():
    torch.manual_seed(0)
    data = torch.randn(8, 3)
    target_net = Affine(3, 2)
    trainer = _trainer(8, 2, grad_clip=0.05, lr_rampup_kimg=0)
    trainer.add_network('f', target_net, dict(class_name='torch.optim.SGD', lr=0.1))
    batches = iter(data.split(2))
    before = {k: v.detach().clone() for k, v in target_net.named_parameters()}
    training_stats.reset()
    trainer.run_phase('f', lambda net: (net(next(batches)) ** 2).sum(dim=1))
    # Reference: the plain full-batch gradient, clipped element-wise, one SGD step.
    ref = Affine(3, 2)
    ((ref(data) ** 2).sum(dim=1).mean()).backward()
    for name, p in ref.named_parameters():
        expect = before[name] - 0.1 * p.grad.clamp(-0.05, 0.05)
        assert torch.allclose(dict(target_net.named_parameters())[name], expect, atol=1e-6), name
    # A non-finite gradient entry is counted, zeroed, and the step stays finite.
    trainer2 = _trainer(4, 1, lr_rampup_kimg=0)
    net2 = Affine(3, 3)
    trainer2.add_network('D', net2, dict(class_name='torch.optim.SGD', lr=0.1))
    # A finite loss whose gradient d/dw[0,0] is NaN (0 * inf); every other gradient entry is finite.
    trainer2.run_phase('D', lambda net: (torch.sqrt(net.w[0, 0] * 0) + net.b.sum()).reshape(1))
    stats = training_stats.Collector().update()
    assert stats['Grad/nonfinite_D'].mean == 1 and all(torch.isfinite(p).all() for p in net2.parameters())
    with pytest.raises(ValueError, match='batch-gpu'):
        _trainer(8, 3)


def test_lr_rampup_and_ema_follow_their_formulas():
    trainer = _trainer(10, None, lr_rampup_kimg=1)
    trainer.cur_nimg = 250
    assert trainer.lr_scale() == 0.25
    # The EMA's half-life: 500 images, or with a ramp-up ratio at most 0.2 x the 250 images seen (50 images).
    for ratio, halflife in ((None, 500), (0.2, 50)):
        trainer = _trainer(10, None, ema_halflife_kimg=0.5, ema_rampup_ratio=ratio)
        net = Affine(2, 0)
        trainer.add_network('G', net, dict(class_name='torch.optim.SGD', lr=0.2))
        trainer.cur_nimg = 250
        with torch.no_grad():
            net.b.fill_(1.0)
        ema_before = trainer.ema['G'].b.clone()
        trainer.update_ema()
        beta = 0.5 ** (10 / halflife)
        assert torch.allclose(trainer.ema['G'].b, beta * ema_before + (1 - beta) * 1.0), ratio


def test_lr_decay_falls_linearly_to_zero_at_the_end_and_sets_the_step_size():
    """lr_decay_kimg: full rate until total - decay, then linear to 0 at total (times the ramp-up); an SGD step
    moves the weights by the decayed rate times the gradient."""
    trainer = _trainer(10, None, lr_rampup_kimg=0.2, lr_decay_kimg=0.4, total_kimg=1.0, grad_clip=0)
    for nimg, expect in ((100, 0.5), (400, 1.0), (600, 1.0), (700, 0.75), (900, 0.25), (1000, 0.0), (1100, 0.0)):
        trainer.cur_nimg = nimg
        assert trainer.lr_scale() == pytest.approx(expect), nimg
    net = Affine(1, 0)
    trainer.add_network('G', net, dict(class_name='torch.optim.SGD', lr=0.2))
    trainer.cur_nimg = 800 # Rate 0.2 x 0.5.
    before = net.b.detach().clone()
    trainer.run_phase('G', lambda m: m.b.sum().reshape(1) * 3.0) # d loss / d b = 3 per entry.
    assert torch.allclose(before - net.b.detach(), torch.full_like(before, 0.2 * 0.5 * 3.0))
    with pytest.raises(ValueError, match='total_kimg'):
        _trainer(10, None, lr_decay_kimg=0.4)


def test_eot_task_keeps_g_out_of_the_graph_in_f_and_d_steps(vector_domains):
    from models.networks import eot_network_kwargs
    G_kw, f_kw, D_kw = eot_network_kwargs((2,), model_channels=4)
    adam = dict(class_name='torch.optim.Adam', lr=1e-3)
    task = eot_task.EOTTask(dnnlib.EasyDict(class_name='data.dataset.VectorDataset', path=vector_domains['data1train']),
                       dnnlib.EasyDict(class_name='data.dataset.VectorDataset', path=vector_domains['data2train']),
                       G_kwargs=G_kw, f_kwargs=f_kw, D_kwargs=D_kw, G_opt_kwargs=adam, f_opt_kwargs=adam,
                       D_opt_kwargs=adam, gamma=0.5, G_iters=2, f_iters=2, D_iters=1)
    trainer = _trainer(8, 4, lr_rampup_kimg=0)
    task.setup(trainer, run_dir=None, seed=0)
    calls = []
    for name in ('G', 'f', 'D'):
        trainer.nets[name].register_forward_hook(
            lambda mod, inp, out, name=name: calls.append((name, torch.is_grad_enabled() and out.requires_grad)))
    phases = []
    orig = trainer.run_phases # (run_phase calls it.)
    trainer.run_phases = lambda names, fn: (phases.append('+'.join(names)), orig(names, fn))
    task.iteration(trainer)
    assert phases == ['f', 'f', 'G', 'f', 'f', 'G', 'D'] # Without reuse_G_output no phase trains two networks.
    # Per phase: 2 accumulation rounds. G's output carries a graph only in G-steps.
    G_calls = [flag for name, flag in calls if name == 'G']
    assert G_calls == [False] * 4 + [True] * 2 + [False] * 4 + [True] * 2 + [False] * 2
    # In G-steps f and D are evaluated with frozen parameters; their weights are trainable again after.
    assert all(p.requires_grad for n in ('f', 'D') for p in trainer.nets[n].parameters())
    # One D-step consumed a batch of domain 2 per round; domain 1 fed every step.
    assert task.data2.consumed == 8 and task.data1.consumed == 7 * 8


def test_lazy_penalty_every_nth_critic_step_weighted_n_times(vector_domains):
    """D_gp_every=N: the penalty on critic steps 0, N, 2N, ... (counted from cur_nimg, so across a resume) with
    weight N * D_gp; the other steps have none and draw no interpolation weights."""
    from models.networks import eot_network_kwargs
    G_kw, f_kw, D_kw = eot_network_kwargs((2,), model_channels=4)
    adam = dict(class_name='torch.optim.Adam', lr=1e-3)
    data = [dnnlib.EasyDict(class_name='data.dataset.VectorDataset', path=vector_domains[k])
            for k in ('data1train', 'data2train')]
    task = eot_task.EOTTask(*data, G_kwargs=G_kw, f_kwargs=f_kw, D_kwargs=D_kw, G_opt_kwargs=adam, f_opt_kwargs=adam,
                            D_opt_kwargs=adam, G_iters=1, f_iters=1, D_iters=2, D_gp=2.5, D_gp_every=3)
    trainer = _trainer(4, 4, lr_rampup_kimg=0)
    task.setup(trainer, run_dir=None, seed=0)
    weights = []
    orig = task.loss.D_loss
    task.loss.D_loss = lambda *args, gp_weight, alpha, **kw: (weights.append((gp_weight, alpha is not None)),
                                                               orig(*args, gp_weight=gp_weight, alpha=alpha, **kw))[1]
    for _ in range(4): # Critic steps 0..7.
        task.iteration(trainer)
        trainer.cur_nimg += trainer.batch_size
    assert weights == [(7.5, True) if k % 3 == 0 else (0.0, False) for k in range(8)]
    with pytest.raises(ValueError, match='D_gp_every'):
        eot_task.EOTTask(*data, D_gp_every=0)


def _reuse_task(vector_domains, **kwargs):
    """(task, trainer, data kwargs, gamma): reuse_G_output with SGD at lr 1 (a step's parameter change is minus its
    gradient), 1 G-step, 2 f-steps, 1 D-step, 2 accumulation rounds, after one iteration (past the zero-initialised
    output layers: every input reaches every gradient)."""
    from models.networks import eot_network_kwargs
    G_kw, f_kw, D_kw = eot_network_kwargs((2,), model_channels=4)
    sgd = dict(class_name='torch.optim.SGD', lr=1.0)
    data = [dnnlib.EasyDict(class_name='data.dataset.VectorDataset', path=vector_domains[k])
            for k in ('data1train', 'data2train')]
    gamma = 0.5
    task = eot_task.EOTTask(*data, G_kwargs=G_kw, f_kwargs=f_kw, D_kwargs=D_kw, G_opt_kwargs=sgd, f_opt_kwargs=sgd,
                            D_opt_kwargs=sgd, gamma=gamma, G_iters=1, f_iters=2, D_iters=1, reuse_G_output=True,
                            **kwargs)
    trainer = _trainer(8, 4, lr_rampup_kimg=0, grad_clip=0)
    task.setup(trainer, run_dir=None, seed=0)
    task.iteration(trainer)
    return task, trainer, data, gamma


def _record_inputs(task, trainer):
    """Lists that fill as the task runs: G's inputs, (x0, detached output) per G call, whether its output carried
    a graph, the bridge noise (t, n) of every draw, the domain-2 batches."""
    G_in, G_out, G_calls, noise, x1s = [], [], [], [], []
    def on_G(mod, inp, out):
        G_calls.append(out.requires_grad)
        G_in.append(inp)
        G_out.append((inp[0], out.detach()))
    trainer.nets['G'].register_forward_hook(on_G)
    orig_noise, orig_next = task._bridge_noise, task.data2.next
    task._bridge_noise = lambda *args: noise.append(orig_noise(*args)) or noise[-1]
    task.data2.next = lambda: x1s.append(orig_next()) or x1s[-1]
    return G_in, G_out, G_calls, noise, x1s


def _check_step(before, after, loss):
    """after = before - grad(loss) (an SGD step at lr 1); the loss may reach other networks' weights too."""
    grads = torch.autograd.grad(loss, list(before.parameters()))
    for p0, p1, grad in zip(before.parameters(), after.parameters(), grads):
        torch.testing.assert_close(p0 - p1, grad, rtol=1e-4, atol=1e-6)


def test_reuse_g_output_trains_f_and_d_on_the_g_steps_outputs(vector_domains):
    """reuse_G_output: per iteration one G-step, its f-steps, then the D-step; f and D train on the G-step's
    inputs and detached outputs (round r on round r), with no G pass and no domain-1 batch of their own; the
    f- and D-step gradients equal the losses of docs/architecture.md written out on those tensors."""
    import copy
    from models.networks import eot_network_kwargs
    task, trainer, data, gamma = _reuse_task(vector_domains)
    G_in, G_out, G_calls, noise, x1s = _record_inputs(task, trainer)
    steps = [] # (phase, the network before the step, the network after it)
    orig_phases = trainer.run_phases # (run_phase calls it.)
    def run_phases(names, fn):
        name, = names # Without share_passes every phase trains one network.
        before = copy.deepcopy(trainer.nets[name])
        orig_phases(names, fn)
        steps.append((name, before, copy.deepcopy(trainer.nets[name])))
    trainer.run_phases = run_phases
    task.iteration(trainer)
    assert [name for name, _, _ in steps] == ['G', 'f', 'f', 'D']
    assert G_calls == [True, True] # The G-step's 2 rounds; no G pass in the f- and D-steps.
    assert task.data1.consumed == 16 and task.data2.consumed == 16 # Over both iterations.
    assert len(noise) == 2 + 2 + 2 # Bridge noise of the G-step's and both f-steps' rounds.

    for k, (_, f0, f1) in enumerate(steps[1:3]): # f-step k, round r: the G-step's round r, its own t and n.
        losses = []
        for r in range(2):
            (x0, xN), (t, n) = G_out[r], noise[2 + 2 * k + r]
            xt = x0 + t[:, None] * (xN - x0) + (gamma * t * (1 - t)).sqrt()[:, None] * n
            losses.append((f0(xt, t) - xN).square().mean())
        _check_step(f0, f1, sum(losses) / 2)
    _, D0, D1 = steps[3]
    _check_step(D0, D1, sum(D0(G_out[r][1]).mean() - D0(x1s[r]).mean() for r in range(2)) / 2)
    _, f_vel, _ = eot_network_kwargs((2,), model_channels=4, drift='velocity')
    with pytest.raises(ValueError, match='reuse_G_output'): # The light G-step has no G outputs to reuse.
        eot_task.EOTTask(*data, f_kwargs=f_vel, G_loss='light', V_kwargs={}, reuse_G_output=True)
    with pytest.raises(ValueError, match='reuse_G_output=True'): # Shared passes serve the steps that reuse.
        eot_task.EOTTask(*data, share_passes=True)


def test_shared_passes_train_f_and_d_on_the_g_steps_outputs_and_passes(vector_domains):
    """reuse_G_output with share_passes: per iteration one phase in which G, f and D step together from the
    G-step's passes (each from its own loss), then the other f-step; f and D train on the G-step's inputs and
    detached outputs (round r on round r), with no G pass and no domain-1 batch of their own. Each network's step equals the gradient of
    its loss of docs/architecture.md written out on those tensors with the networks before the phase (so the
    shared passes leak no gradient from one network's loss into another's weights)."""
    import copy
    task, trainer, data, gamma = _reuse_task(vector_domains, share_passes=True)
    G_in, G_out, G_calls, noise, x1s = _record_inputs(task, trainer)
    steps = [] # (phase's networks, {name: network before the phase}, {name: network after it})
    orig_phases = trainer.run_phases # (run_phase calls it.)
    def run_phases(names, fn):
        before = {name: copy.deepcopy(trainer.nets[name]) for name in ('G', 'f', 'D')}
        orig_phases(names, fn)
        steps.append(('+'.join(names), before, {name: copy.deepcopy(trainer.nets[name]) for name in names}))
    trainer.run_phases = run_phases
    task.iteration(trainer)
    assert [names for names, _, _ in steps] == ['G+f+D', 'f']
    assert G_calls == [True, True] # The G-step's 2 rounds; no G pass in the f-step.
    assert task.data1.consumed == 16 and task.data2.consumed == 16 # Over both iterations.
    assert len(noise) == 2 + 2 # Bridge noise of the G-step's rounds (shared with the first f-step), the f-step's.

    def bridge(x0, xN, t, n):
        return x0 + t[:, None] * (xN - x0) + (gamma * t * (1 - t)).sqrt()[:, None] * n

    _, nets0, nets1 = steps[0]
    G0, f0, D0 = (nets0[name] for name in ('G', 'f', 'D'))
    G_losses = []
    for r in range(2):
        (x0, z), (t, n) = G_in[r], noise[r]
        xN = G0(x0, z)
        xt = bridge(x0, xN, t, n)
        drift = f0(xt, t) - xt
        transport = 2 * ((drift * (xN - xt)).mean(1) - drift.square().mean(1) / 2)
        G_losses.append((transport - D0(xN)).mean())
    _check_step(G0, nets1['G'], sum(G_losses) / 2)
    for k, (f_before, f_after, first) in enumerate([(f0, nets1['f'], 0), (steps[1][1]['f'], steps[1][2]['f'], 2)]):
        losses = [] # f-step k, round r: the G-step's round r; the first at the G-step's own t and n.
        for r in range(2):
            (x0, xN), (t, n) = G_out[r], noise[first + r]
            losses.append((f_before(bridge(x0, xN, t, n), t) - xN).square().mean())
        _check_step(f_before, f_after, sum(losses) / 2)
    _check_step(D0, nets1['D'], sum(D0(G_out[r][1]).mean() - D0(x1s[r]).mean() for r in range(2)) / 2)


def test_eot_task_kinetic_needs_a_velocity_drift(vector_domains):
    from models.networks import eot_network_kwargs
    data = [dnnlib.EasyDict(class_name='data.dataset.VectorDataset', path=vector_domains[k])
            for k in ('data1train', 'data2train')]
    _, f_end, _ = eot_network_kwargs((2,), model_channels=4)
    with pytest.raises(ValueError, match='VelocityDrift'):
        eot_task.EOTTask(*data, f_kwargs=f_end, G_loss='kinetic')
    with pytest.raises(ValueError, match='G_loss'):
        eot_task.EOTTask(*data, f_kwargs=f_end, G_loss='weighted')
    _, f_vel, _ = eot_network_kwargs((2,), model_channels=4, drift='velocity')
    task = eot_task.EOTTask(*data, f_kwargs=f_vel, G_loss='kinetic', gamma=0.3)
    assert type(task.loss) is eot_loss.KineticEOTLoss and task.loss.gamma == 0.3
    assert type(eot_task.EOTTask(*data, f_kwargs=f_end).loss) is eot_loss.EOTLoss


def test_nonfinite_loss_skips_or_stops():
    from training.trainer import DivergenceError
    for policy in ('skip', 'stop'):
        trainer = _trainer(4, 2, lr_rampup_kimg=0, nan_policy=policy)
        net = Affine(2, 0)
        trainer.add_network('G', net, dict(class_name='torch.optim.Adam', lr=0.1))
        before = [p.detach().clone() for p in net.parameters()]
        training_stats.reset()
        nan_loss = lambda m: (m(torch.ones(2, 2)).sum(dim=1) * float('nan'))
        if policy == 'skip':
            trainer.run_phase('G', nan_loss)
            assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())) # Step skipped.
            assert all(s == {} for s in [s for s in trainer.opt['G'].state.values()]) # Adam untouched.
            trainer.run_phase('G', lambda m: m(torch.ones(2, 2)).sum(dim=1))
            stats = training_stats.Collector().update()
            assert stats['Divergence/skipped_G'].num == 2 and stats['Divergence/skipped_G'].mean == 0.5
        else:
            trainer.last_good = dict(snapshot='run/network-snapshot-000004.pkl', state='run/training-state-000004.pt')
            with pytest.raises(DivergenceError, match='network-snapshot-000004.pkl.*--resume=run/training-state-000004.pt'):
                trainer.run_phase('G', nan_loss)
    with torch.no_grad():
        net.w[0, 0] = float('inf')
    with pytest.raises(DivergenceError, match='Non-finite parameters in network G'):
        trainer.check_finite()


def test_energy_score_matches_a_brute_force_loop():
    """LightEOTLoss.energy_score: mean_i |Y_i - y| - sum_{i != j} |Y_i - Y_j| / (2 m (m - 1)), per input."""
    gen = torch.Generator().manual_seed(0)
    ys, y = torch.randn(5, 3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    got = eot_loss.LightEOTLoss(0.5).energy_score(ys, y)
    for n in range(3):
        to_target = sum(math.dist(ys[i, n].tolist(), y[n].tolist()) for i in range(5)) / 5
        between = sum(math.dist(ys[i, n].tolist(), ys[j, n].tolist()) for i in range(5) for j in range(5) if i != j)
        assert float(got[n]) == pytest.approx(to_target - between / (2 * 5 * 4), rel=1e-5)


def _light_task(vector_domains, **kwargs):
    from models.networks import eot_network_kwargs
    G_kw, f_kw, D_kw = eot_network_kwargs((2,), model_channels=4, drift='velocity')
    adam = dict(class_name='torch.optim.Adam', lr=1e-3)
    data = [dnnlib.EasyDict(class_name='data.dataset.VectorDataset', path=vector_domains[k])
            for k in ('data1train', 'data2train')]
    V_kw = dnnlib.EasyDict(class_name='models.light_sb.LightPotential', dim=2, components=4, eps=0.5)
    return eot_task.EOTTask(*data, G_kwargs=G_kw, f_kwargs=f_kw, D_kwargs=D_kw, G_opt_kwargs=adam, f_opt_kwargs=adam,
                            D_opt_kwargs=adam, V_kwargs=V_kw, V_opt_kwargs=adam, gamma=0.5, G_loss='light', **kwargs)


def test_light_iteration_fits_v_then_f_and_g_to_v_s_plan(vector_domains):
    """One V-step, then G_iters x (f_iters f-steps, one G-step); no critic step. f regresses the bridge to V's
    samples (G is not called in f-steps), G's outputs carry a graph only in G-steps, SAMPLES draws per input."""
    task = _light_task(vector_domains, G_iters=2, f_iters=2, D_iters=3)
    trainer = _trainer(8, 8, lr_rampup_kimg=0)
    task.setup(trainer, run_dir=None, seed=0)
    # V's means: k-means++ seeds among the target items (tests/models/test_light_sb.py), drawn with the run's seed.
    items = torch.as_tensor(np.stack([task.data2.dataset[i][0] for i in range(len(task.data2.dataset))]))
    assert all(any(torch.equal(mean, item) for item in items) for mean in trainer.nets['V'].means)
    twin = trainer.nets['V'].__class__(2, components=4, eps=0.5)
    twin.init_from(items, generator=torch.Generator().manual_seed(0))
    assert torch.equal(trainer.nets['V'].means, twin.means)
    calls, samples = [], []
    trainer.nets['G'].register_forward_hook(lambda mod, inp, out: calls.append((inp[0].shape[0], out.requires_grad)))
    trainer.nets['D'].register_forward_hook(lambda mod, inp, out: calls.append(('D',)))
    orig_sample = trainer.nets['V'].sample
    trainer.nets['V'].sample = lambda x, u, z: (samples.append(x.shape[0]), orig_sample(x, u, z))[1]
    phases = []
    orig = trainer.run_phase
    trainer.run_phase = lambda name, fn: (phases.append(name), orig(name, fn))
    V_before = {k: v.clone() for k, v in trainer.nets['V'].state_dict().items()}
    task.iteration(trainer)
    assert phases == ['V', 'f', 'f', 'G', 'f', 'f', 'G']
    assert calls == [(8 * eot_loss.LightEOTLoss.SAMPLES, True)] * 2 # Only the G-steps call G; D never.
    assert samples == [8] * 6                                         # A plan sample per f- and G-step.
    assert any(not torch.equal(V_before[k], v) for k, v in trainer.nets['V'].state_dict().items())
    assert task.data2.consumed == 8 and task.data1.consumed == 7 * 8


def test_light_g_loss_needs_its_potential_and_a_velocity_drift(vector_domains):
    task = _light_task(vector_domains)
    assert type(task.loss) is eot_loss.LightEOTLoss and set(task.networks()) == {'G', 'f', 'D', 'V'}
    with pytest.raises(ValueError, match='V_kwargs'):
        _light_task(vector_domains).__class__(*[task.kwargs.data1_kwargs, task.kwargs.data2_kwargs],
                                              f_kwargs=task.net_kwargs['f'], G_loss='light')
    from models.networks import eot_network_kwargs
    _, f_end, _ = eot_network_kwargs((2,), model_channels=4)
    with pytest.raises(ValueError, match='VelocityDrift'):
        eot_task.EOTTask(task.kwargs.data1_kwargs, task.kwargs.data2_kwargs, f_kwargs=f_end, G_loss='light',
                         V_kwargs=task.net_kwargs['V'])
