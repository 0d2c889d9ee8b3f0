"""Tests for transport/semidiscrete.py: numbers are checked against closed forms and brute force."""

import math
import os
import subprocess
import sys

import pytest
import torch

from transport import semidiscrete as sd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, '..', '..'))

#----------------------------------------------------------------------------
# Helpers (independent of the module under test).

def brute_scores(x, y, h):
    """All scores <x, y_i> + h_i in float64."""
    return x.double() @ y.double().T + h.double()


def exact_masses_1d(y, h, source, K=1_000_000):
    """Cell masses of a 1-D problem from a stratified grid of K equal-mass points (error <= N / K)."""
    q = (torch.arange(K, dtype=torch.float64) + 0.5) / K
    x = q if source == 'uniform' else math.sqrt(2.0) * torch.erfinv(2 * q - 1)
    idx = torch.empty(K, dtype=torch.int64)
    for s in range(0, K, 200_000):
        idx[s:s + 200_000] = (x[s:s + 200_000, None] * y.double()[None, :, 0] + h.double()).argmax(dim=1)
    return torch.bincount(idx, minlength=y.shape[0]).double() / K


def closed_form_h_1d(y_sorted, source):
    """Heights whose cells are the N equal-mass intervals, in sorted order (h_0 = 0).

    The boundary b_k between sorted targets k and k+1 is the (k+1)/N quantile of the source, and
    x y_k + h_k = x y_(k+1) + h_(k+1) at x = b_k gives h_(k+1) = h_k - b_k (y_(k+1) - y_k).
    """
    N = y_sorted.shape[0]
    q = torch.arange(1, N, dtype=torch.float64) / N
    b = q if source == 'uniform' else math.sqrt(2.0) * torch.erfinv(2 * q - 1)
    dy = y_sorted[1:, 0].double() - y_sorted[:-1, 0].double()
    return torch.cat([torch.zeros(1, dtype=torch.float64), -torch.cumsum(b * dy, 0)])

#----------------------------------------------------------------------------
# assign / topk against brute force.

@pytest.mark.parametrize('source', ['uniform', 'normal'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_assign_matches_brute_force(source, dtype):
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(300, 7, generator=gen, dtype=dtype)
    h = torch.randn(300, generator=gen, dtype=dtype)
    x = torch.rand(2000, 7, generator=gen, dtype=dtype) + (0 if source == 'uniform' else -0.5)
    prob = sd.SemidiscreteProblem(y, source)
    want = brute_scores(x, y, h).argmax(dim=1)
    assert torch.equal(prob.assign(x, h), want)
    # Chunks and blocks that do not divide N or M exercise the running maximum.
    assert torch.equal(prob.assign(x, h, chunk_size=37, block_size=333), want)


def test_topk_matches_torch_topk():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(150, 5, generator=gen, dtype=torch.float64)
    h = torch.randn(150, generator=gen, dtype=torch.float64)
    x = torch.randn(500, 5, generator=gen, dtype=torch.float64)
    prob = sd.SemidiscreteProblem(y, 'normal')
    for k, chunk in ((1, 16), (3, 16), (150, 64)):
        want = brute_scores(x, y, h).topk(k, dim=1).indices
        assert torch.equal(prob.assign(x, h, topk=k, chunk_size=chunk, block_size=250), want)
    assert prob.assign(x, h, topk=2).shape == (500, 2)


def test_bfloat16_assign_with_rescoring_is_exact():
    """Image-like centred data: bf16 shortlists + exact re-scoring give the float64 arg-max."""
    gen = torch.Generator().manual_seed(2)
    y = (torch.randn(400, 3, 4, 4, generator=gen).repeat_interleave(4, 2).repeat_interleave(4, 3)
         + 0.1 * torch.randn(400, 3, 16, 16, generator=gen)).reshape(400, -1).tanh()
    prob = sd.SemidiscreteProblem(y, 'uniform')
    h = prob.from_centred(-2.0 * (y - y.mean(0)).norm(dim=1) / math.sqrt(12)).float()
    x = torch.rand(3000, y.shape[1], generator=gen)
    want = brute_scores(x, y, h.double()).topk(3, dim=1).indices
    got = prob.assign(x, h, topk=3, dtype=torch.bfloat16, chunk_size=100, rescore=4)
    assert torch.equal(got[:, 0], want[:, 0])
    assert (got == want).all(dim=1).float().mean() > 0.995


def test_bfloat16_solver_kernel_finds_the_exact_winner():
    """The solver's pass re-scores only pairs within the rounding bound; its winners are still exact."""
    gen = torch.Generator().manual_seed(12)
    for source in ('uniform', 'normal'):
        y = (torch.nn.functional.interpolate(torch.randn(500, 3, 4, 4, generator=gen), size=(16, 16),
                                             mode='bilinear').tanh() + 0.1 * torch.randn(500, 3, 16, 16, generator=gen))
        prob = sd.SemidiscreteProblem(y.reshape(500, -1), source)
        g = sd._init_norm(prob).float()
        xc = prob.centre(torch.rand(4000, prob.dim, generator=gen) if source == 'uniform'
                         else torch.randn(4000, prob.dim, generator=gen))
        want = brute_scores(xc, prob._yc, g).topk(2, dim=1)
        for exact in ('winner', 'leaders'):
            vals, idx = sd._Scorer(prob, dtype=torch.bfloat16, chunk_size=128).topk(xc, g, 2, exact=exact)
            assert torch.equal(idx[:, 0], want.indices[:, 0]), (source, exact)
        torch.testing.assert_close(vals[:, 0].double(), want.values[:, 0], atol=1e-3, rtol=0)   # 'leaders'


def test_voronoi_start_leaves_no_cell_empty_in_1d():
    y = torch.randn(40, 1, generator=torch.Generator().manual_seed(13), dtype=torch.float64) * 2
    prob = sd.SemidiscreteProblem(y, 'uniform')
    masses = exact_masses_1d(y, prob.from_centred(sd._init_voronoi(prob)), 'uniform')
    assert int((masses == 0).sum()) == 0
    zero = exact_masses_1d(y, prob.from_centred(torch.zeros(40, dtype=torch.float64)), 'uniform')
    assert int((zero == 0).sum()) > 30          # h = 0 leaves all but the extreme slopes empty


def test_centring_round_trip_and_invariance():
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(40, 6, generator=gen, dtype=torch.float64) + 3.0
    h = torch.randn(40, generator=gen, dtype=torch.float64)
    x = torch.rand(200, 6, generator=gen, dtype=torch.float64)
    prob = sd.SemidiscreteProblem(y, 'uniform')
    g = prob.to_centred(h)
    torch.testing.assert_close(prob.from_centred(g), h)
    # Centred scores differ from the original ones by a per-sample constant only.
    diff = brute_scores(x, y, h) - (brute_scores(x - 0.5, y - y.mean(0), g))
    torch.testing.assert_close(diff - diff[:, :1], torch.zeros_like(diff), atol=1e-9, rtol=0)

#----------------------------------------------------------------------------
# evaluate: counts and debiasing.

def test_evaluate_counts_and_formulas_against_brute_force():
    gen = torch.Generator().manual_seed(4)
    N, M = 30, 5000
    y = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    h = torch.randn(N, generator=gen, dtype=torch.float64)
    x = torch.rand(M, 3, generator=gen, dtype=torch.float64)
    prob = sd.SemidiscreteProblem(y, 'uniform')
    ev = sd.evaluate(prob, h, x=x, block_size=777, chunk_size=7)
    counts = torch.zeros(N, dtype=torch.int64)
    for i in brute_scores(x, y, h).argmax(dim=1).tolist():
        counts[i] += 1
    assert torch.equal(ev['counts'], counts)
    r = [N * c / M - 1 for c in counts.tolist()]
    raw = sum(v * v for v in r) / N
    assert ev['rms_raw'] == pytest.approx(math.sqrt(raw), rel=1e-12)
    assert ev['rms'] == pytest.approx(math.sqrt(max((raw - (N - 1) / M) / (1 - 1 / M), 0)), rel=1e-12)
    assert ev['max_abs'] == pytest.approx(max(abs(v) for v in r), rel=1e-12)
    assert ev['empty'] == sum(c == 0 for c in counts.tolist())
    assert ev['noise_floor'] == pytest.approx(math.sqrt(2 * math.log(N) * N / M))


def test_debiased_rms_is_unbiased():
    """On a 1-D problem with exactly known (unequal) masses, mean r_hat^2 is biased by ~N / M and the
    debiased estimate is not."""
    y = torch.tensor([[-2.0], [-1.0], [0.0], [1.5], [2.0]], dtype=torch.float64)
    N, M, reps = 5, 40, 1000
    # Boundaries at 0.1, 0.3, 0.55, 0.8: masses 0.1, 0.2, 0.25, 0.25, 0.2.
    b = torch.tensor([0.1, 0.3, 0.55, 0.8], dtype=torch.float64)
    h = torch.cat([torch.zeros(1, dtype=torch.float64), -torch.cumsum(b * (y[1:, 0] - y[:-1, 0]), 0)])
    p = torch.tensor([0.1, 0.2, 0.25, 0.25, 0.2], dtype=torch.float64)
    torch.testing.assert_close(exact_masses_1d(y, h, 'uniform', K=200_000), p, atol=1e-4, rtol=0)
    true_r2 = float(((N * p - 1) ** 2).mean())
    prob = sd.SemidiscreteProblem(y, 'uniform')
    x = torch.rand(reps, M, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    est, raw = [], []
    for i in range(reps):
        ev = sd.evaluate(prob, h, x=x[i])
        est.append(ev['r2_debiased'])
        raw.append(ev['rms_raw'] ** 2)
    est, raw = torch.tensor(est), torch.tensor(raw)
    se = float(est.std()) / math.sqrt(reps)
    assert abs(float(est.mean()) - true_r2) < 4 * se
    assert float(raw.mean()) - true_r2 > 10 * se      # the raw estimate is visibly biased

#----------------------------------------------------------------------------
# Exact solutions.

@pytest.mark.parametrize('source', ['uniform', 'normal'])
def test_1d_intervals_closed_form(source):
    gen = torch.Generator().manual_seed(6)
    N = 8
    y = (torch.rand(N, 1, generator=gen, dtype=torch.float64) * 4 - 2).sort(dim=0).values
    prob = sd.SemidiscreteProblem(y, source)
    solver = sd.SemidiscreteSolver(max_iters=400, tol=0.01, samples_per_iter=20_000, block_size=20_000)
    out = solver(prob, generator=torch.Generator().manual_seed(0))
    assert out.converged
    r = N * exact_masses_1d(y, out.h, source) - 1
    assert float(r.pow(2).mean().sqrt()) < 0.02 and float(r.abs().max()) < 0.05
    want = closed_form_h_1d(y, source)
    # Boundary errors of at most max|r| (in mass) accumulate along the chain: |dh| <= ~max|r| * range(y)
    # for the uniform source (more in the tails of the normal one).
    err = float(((out.h - out.h.mean()) - (want - want.mean())).abs().max())
    assert err < 0.05 * float(y.max() - y.min()), err


@pytest.mark.parametrize('source', ['uniform', 'normal'])
def test_cube_corners_give_constant_centred_heights(source):
    """Targets at the 2^3 corners of a cube centred at the origin: by symmetry the centred heights are
    constant (h constant for 'normal'; h_i + <1/2, y_i> constant for 'uniform'), cells are orthants."""
    y = torch.tensor([[a, b, c] for a in (-1., 1.) for b in (-1., 1.) for c in (-1., 1.)], dtype=torch.float64)
    prob = sd.SemidiscreteProblem(y, source)
    shift = 0.5 * y.sum(dim=1) if source == 'uniform' else torch.zeros(8, dtype=torch.float64)
    h0 = -shift + 0.3 * torch.randn(8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = sd.SemidiscreteSolver(max_iters=200, tol=0.01, samples_per_iter=20_000, block_size=20_000)(
        prob, generator=torch.Generator().manual_seed(1), h0=h0)
    assert out.converged
    g = out.h + shift
    assert float((g - g.mean()).abs().max()) < 0.03      # started 0.3 away
    ev = sd.evaluate(prob, out.h, 200_000, torch.Generator().manual_seed(2))
    assert ev['rms'] < 0.02 and ev['empty'] == 0


def test_circle_gives_constant_heights():
    N = 12
    a = 2 * math.pi * torch.arange(N, dtype=torch.float64) / N
    y = torch.stack([a.cos(), a.sin()], dim=1)
    prob = sd.SemidiscreteProblem(y, 'normal')
    h0 = 0.2 * torch.randn(N, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = sd.SemidiscreteSolver(max_iters=200, tol=0.01, samples_per_iter=30_000, block_size=30_000)(
        prob, generator=torch.Generator().manual_seed(3), h0=h0)
    assert out.converged
    assert float((out.h - out.h.mean()).abs().max()) < 0.02
    # Masses on a stratified polar grid of equal-mass points (uniform angle x Rayleigh radius quantiles).
    t = 2 * math.pi * (torch.arange(3600, dtype=torch.float64) + 0.5) / 3600
    rad = torch.sqrt(-2 * torch.log1p(-(torch.arange(200, dtype=torch.float64) + 0.5) / 200))
    x = (rad[:, None, None] * torch.stack([t.cos(), t.sin()], 1)[None]).reshape(-1, 2)
    masses = torch.bincount(brute_scores(x, y, out.h).argmax(dim=1), minlength=N).double() / x.shape[0]
    assert float((N * masses - 1).abs().max()) < 0.05


@pytest.mark.parametrize('settings', [dict(step='adam', lr=0.5), dict(qmc=True)])
def test_circle_with_adam_and_qmc(settings):
    N = 12
    a = 2 * math.pi * torch.arange(N, dtype=torch.float64) / N
    y = torch.stack([a.cos(), a.sin()], dim=1)
    prob = sd.SemidiscreteProblem(y, 'normal')
    h0 = 0.2 * torch.randn(N, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = sd.SemidiscreteSolver(max_iters=300, tol=0.02, samples_per_iter=8192, block_size=8192, **settings)(
        prob, generator=torch.Generator().manual_seed(3), h0=h0)
    assert out.converged
    assert float((out.h - out.h.mean()).abs().max()) < 0.03


def test_image_like_high_dim_converges_in_bf16():
    """d = 192 image-like targets: the default solver in bf16 reaches tol, certified independently."""
    gen = torch.Generator().manual_seed(9)
    N = 200
    y = (torch.nn.functional.interpolate(torch.randn(N, 3, 4, 4, generator=gen), size=(8, 8), mode='bilinear')
         .tanh() + 0.1 * torch.randn(N, 3, 8, 8, generator=gen)).reshape(N, -1)
    prob = sd.SemidiscreteProblem(y, 'uniform')
    out = sd.SemidiscreteSolver(max_iters=100, tol=0.05, dtype=torch.bfloat16)(
        prob, generator=torch.Generator().manual_seed(4))
    assert out.converged and out.check['rms'] <= 0.05
    ev = sd.evaluate(prob, out.h, 400 * N, torch.Generator().manual_seed(5))
    assert ev['rms'] < 0.07 and ev['empty'] == 0
    assert ev['max_abs'] < 4 * ev['noise_floor']

#----------------------------------------------------------------------------
# State, resume, callback.

def _strip(history):
    return [{k: v for k, v in row.items() if k != 'time_s'} for row in history]


def test_resume_continues_exactly():
    gen = torch.Generator().manual_seed(10)
    prob = sd.SemidiscreteProblem(torch.randn(50, 6, generator=gen), 'normal')
    kw = dict(tol=0.0, samples_per_iter=500, block_size=128, patience=2)
    full = sd.SemidiscreteSolver(max_iters=12, **kw)(prob, generator=torch.Generator().manual_seed(0))
    part = sd.SemidiscreteSolver(max_iters=5, **kw)(prob, generator=torch.Generator().manual_seed(0))
    # The state survives torch.save / torch.load(weights_only=True).
    import io
    buf = io.BytesIO()
    torch.save(part.state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    rest = sd.SemidiscreteSolver(max_iters=12, **kw)(prob, generator=torch.Generator().manual_seed(99), resume=state)
    assert rest.num_iters == 12 and full.num_iters == 12
    assert torch.equal(rest.h, full.h)
    assert _strip(part.history + rest.history) == _strip(full.history)
    assert rest.num_samples_used == full.num_samples_used


def test_callback_sees_every_iteration_and_can_stop():
    prob = sd.SemidiscreteProblem(torch.randn(20, 3, generator=torch.Generator().manual_seed(11)), 'normal')
    seen = []

    def callback(it, info):
        seen.append((it, info['rms'], info['empty']))
        return it == 3

    out = sd.SemidiscreteSolver(max_iters=50, tol=0.0)(prob, callback=callback)
    assert [s[0] for s in seen] == [1, 2, 3] and out.num_iters == 3 and len(out.history) == 3
    assert set(out.history[0]) >= {'grad_norm', 'max_rel_err', 'empty', 'rms', 'num_samples', 'check_rms'}


def test_single_target_is_trivial():
    prob = sd.SemidiscreteProblem(torch.ones(1, 4), 'uniform')
    out = sd.SemidiscreteSolver()(prob)
    assert out.converged and out.h.shape == (1,)
    assert torch.equal(prob.assign(torch.rand(5, 4), out.h), torch.zeros(5, dtype=torch.int64))

#----------------------------------------------------------------------------
# Distributed: 2 gloo processes give the single-process answer.

def test_distributed_two_processes_match_single_process(tmp_path):
    sys.path.insert(0, HERE)
    import _semidiscrete_dist_worker as worker
    out_path = tmp_path / 'dist.pt'
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(HERE, '_semidiscrete_dist_worker.py'), str(out_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dist = torch.load(out_path, weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # the workers ran with one thread each
    try:
        for mode in worker.CONFIGS:
            single = worker.run(mode)
            if mode in worker.APPROXIMATE:
                # The same cells in the end, from slightly different gap statistics on the way.
                spread = float(single['h'].std())
                assert float((dist[mode]['h'] - single['h']).abs().max()) < 0.05 * spread, mode
                assert dist[mode]['converged'] == single['converged'], mode
                continue
            assert torch.equal(dist[mode]['h'], single['h']), mode
            assert _strip(dist[mode]['history']) == _strip(single['history']), mode
            assert torch.equal(dist[mode]['eval_counts'], single['eval_counts']), mode
            assert dist[mode]['num_samples_used'] == single['num_samples_used'], mode
    finally:
        torch.set_num_threads(threads)

#----------------------------------------------------------------------------
# Bad input gives clear errors.

def test_bad_inputs_raise_clear_errors():
    y = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r'non-finite.*row 4'):
        bad = y.clone()
        bad[4, 1] = float('nan')
        sd.SemidiscreteProblem(bad)
    with pytest.raises(ValueError, match='N = 0'):
        sd.SemidiscreteProblem(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r'shape \[N, d\]'):
        sd.SemidiscreteProblem(torch.zeros(3))
    with pytest.raises(ValueError, match="unknown source 'gauss'"):
        sd.SemidiscreteProblem(y, 'gauss')
    with pytest.raises(TypeError, match='floating'):
        sd.SemidiscreteProblem(torch.zeros(3, 2, dtype=torch.int64))
    prob = sd.SemidiscreteProblem(y)
    h = torch.zeros(10)
    with pytest.raises(ValueError, match=r'd = 3.*got shape \[5, 4\]'):
        prob.assign(torch.rand(5, 4), h)
    with pytest.raises(ValueError, match=r'shape \[N\] = \[10\]'):
        prob.assign(torch.rand(5, 3), torch.zeros(9))
    with pytest.raises(ValueError, match='topk=11'):
        prob.assign(torch.rand(5, 3), h, topk=11)
    with pytest.raises(ValueError, match='non-finite'):
        prob.assign(torch.full((2, 3), float('inf')), h)
    with pytest.raises(ValueError, match='unknown step'):
        sd.SemidiscreteSolver(step='sgd')
    with pytest.raises(ValueError, match='lr=0'):
        sd.SemidiscreteSolver(lr=0)
    with pytest.raises(ValueError, match='dtype'):
        sd.SemidiscreteSolver(dtype=torch.int32)(prob, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match='different problem'):
        out = sd.SemidiscreteSolver(max_iters=1, tol=0)(prob)
        sd.SemidiscreteSolver(max_iters=2)(sd.SemidiscreteProblem(torch.randn(11, 3)), resume=out.state)

#----------------------------------------------------------------------------
# State versions and the checks' trend.

def test_state_versions_round_trip_and_old_states_load():
    fixture = os.path.join(ROOT, 'tests', 'fixtures', 'v1', 'potential-unfinished', 'potential-state.pt')
    old = torch.load(fixture, weights_only=True)['state']
    assert old['version'] == 1 and 'kind' not in old
    st = sd.SolverState.from_dict(old)
    assert st.iter == 3 and st.checks == [] and not st.plateau and torch.equal(st.g, old['g'])
    d = st.to_dict()
    assert d['version'] == sd.SolverState.VERSION and d['kind'] == 'monte-carlo'
    again = sd.SolverState.from_dict(d)
    assert all(torch.equal(getattr(again, k), getattr(st, k)) if torch.is_tensor(getattr(st, k))
               else getattr(again, k) == getattr(st, k) for k in d if k not in ('version', 'kind'))
    with pytest.raises(ValueError, match='version 99'):
        sd.SolverState.from_dict(dict(old, version=99))
    with pytest.raises(ValueError, match="kind 'newton'"):
        sd.SolverState.from_dict(dict(d, kind='newton'))
    damaged = dict(d)
    del damaged['g_avg']
    with pytest.raises(ValueError, match='lacks g_avg'):
        sd.SolverState.from_dict(damaged)


def test_check_trend_fits_the_rate_and_projects_the_iterations():
    n = [1000 * 1.25 ** k for k in range(6)]
    # rms = 3 n^-0.5: slope 1/2; reaching tol needs n* = (3 / tol)^2 averaged samples.
    checks = [[v, 3 * v ** -0.5] for v in n]
    t = sd.check_trend(checks, tol=0.05, samples_per_iter=100)
    assert t['slope'] == pytest.approx(0.5, rel=1e-9) and not t['plateau']
    assert t['projected_iters'] == math.ceil(((3 / 0.05) ** 2 - n[-1]) / 100)
    flat = [[v, 0.2 * (1 + 0.01 * (-1) ** k)] for k, v in enumerate(n)]
    t = sd.check_trend(flat, tol=0.05, samples_per_iter=100)
    assert t['plateau'] and abs(t['slope']) < 0.05 and t['projected_iters'] == math.inf
    assert not sd.check_trend(flat, tol=0.15, samples_per_iter=100)['plateau']     # within 1.5 tol: not a plateau
    assert sd.check_trend(checks[:4], tol=0.05, samples_per_iter=100) is None
    done = sd.check_trend(checks, tol=1.0, samples_per_iter=100)
    assert done['projected_iters'] == 0


def test_low_dimensional_float32_targets_are_scored_in_float64():
    """Cells of tight clusters are thin in score space: for d <= 3 scores are float64 whatever the targets' dtype
    (assignments then agree with float64 brute force even a hair away from a boundary)."""
    y = torch.tensor([[0.0, 0.0], [1e-3, 0.0], [0.0, 1e-3]], dtype=torch.float32)
    prob = sd.SemidiscreteProblem(y, 'uniform')
    assert prob._exact == torch.float64 and sd.SemidiscreteProblem(torch.randn(5, 4), 'uniform')._exact == torch.float32
    h = torch.tensor([0.0, -1e-3 * 0.3, -1.0], dtype=torch.float64)         # cells 0 | 1 split at x_0 = 0.3
    x = torch.tensor([[0.3 - 1e-7, 0.1], [0.3 + 1e-7, 0.1]], dtype=torch.float32).double()
    want = brute_scores(x, y, h).argmax(dim=1)
    assert want.tolist() == [0, 1] and torch.equal(prob.assign(x, h), want)
