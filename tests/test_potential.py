"""potential.py end to end on tiny data: the file it writes (checked against an independent recomputation),
resume from its checkpoint, torchrun, and bad input."""

import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import potential
from tests.conftest import write_image_zip, write_vector_npz
from tests.launch import torchrun
from sampling import dpmot
from torch_utils import misc
from sampling import potential as potential_lib
from sampling import snapshots
from models.networks import Denoiser

SOLVER = []  # the solver's defaults (exact for these 2-D latents); one test passes --solver-step=adam


@pytest.fixture
def vector_setup(tmp_path):
    torch.manual_seed(0)
    net = Denoiser([2], model_channels=16, depth=2).eval().requires_grad_(False)
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dict(ema=net, kind='denoiser', kimg=1.0), f)
    data = write_vector_npz(tmp_path / 'data.npz', 64, dim=2, seed=0)
    return str(tmp_path / 'net.pkl'), data, net


def _run(*args):
    return CliRunner().invoke(potential.main, ['--no-progress', '--device=cpu', *SOLVER, *map(str, args)])


def test_vector_potential_end_to_end(tmp_path, vector_setup):
    pkl, data, net = vector_setup
    out = tmp_path / 'pot'
    res = _run(f'--network={pkl}', f'--data={data}', '--steps=10', '--back-steps=3', '--num-targets=16',
               f'--outdir={out}', '--seed=4')
    assert res.exit_code == 0, res.output
    assert 'Solver: exact' in res.output and 'Converged after' in res.output     # d = 2: the exact solver
    raw = torch.load(out / 'potential.pt', weights_only=True)
    pot = potential_lib.load_potential(out / 'potential.pt')
    # Independent recomputation of the latents: a seeded subset, then y = x + sigma_(S-K) n with seeded noise.
    S, K, rho = 10, 3, 7.0
    i = S - K
    sigma = (80 ** (1 / rho) + i / (S - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    idx = np.sort(np.random.default_rng(4).permutation(64)[:16])
    x = torch.as_tensor(np.load(data)['x'][idx])
    y = x + sigma * torch.randn([16, 2], generator=torch.Generator().manual_seed(4))
    assert raw['indices'].tolist() == idx.tolist() and raw['sigma'] == pytest.approx(sigma, rel=1e-12)
    torch.testing.assert_close(pot['targets'], y)
    assert pot['num_steps'] == S and pot['back_steps'] == K and pot['source'] == 'uniform'
    # The heights solve the problem: fresh samples fill every cell evenly.
    assert pot['solver']['converged'] and pot['solver']['eval']['empty'] == 0
    from transport.semidiscrete import SemidiscreteProblem, evaluate
    stats = evaluate(SemidiscreteProblem(targets=pot['targets'], source='uniform'), pot['h'], num_samples=64000,
                     generator=torch.Generator().manual_seed(99))
    assert stats['rms'] < 0.1 and stats['empty'] == 0
    # Provenance.
    from data.dataset import VectorDataset
    prov = pot['provenance']
    assert prov['data_sha256'] == VectorDataset(data).data_hash()
    assert prov['denoiser_sha256'] == misc.state_dict_sha256(net) and prov['network_kimg'] == 1.0
    log = open(out / 'log.txt').read()
    assert 'iter 1 ' in log and 'Solver: exact' in log and 'rms' in log and 'Wrote' in log
    # The recorded command is this call's options (in-process, sys.argv is pytest's).
    words = prov['command'].split()
    assert words[0] == 'potential.py' and prov['command'] in log
    assert {'--back-steps=3', '--num-targets=16', '--seed=4', f'--network={pkl}'} <= set(words)
    assert os.path.isfile(out / potential.STATE_NAME)
    # Generation with it: the last K steps, same seed same sample.
    with open(pkl, 'rb') as f:
        loaded = pickle.load(f)['ema']
    a, info = dpmot.generate_samples(loaded, range(6), pot, sampler='heun', batch_size=4)
    b, _ = dpmot.generate_samples(loaded, [3, 4, 5], out / 'potential.pt', sampler='heun')
    assert a.shape == (6, 2) and info['nfe'] == 2 * K - 1 and torch.equal(a[3:], b)


def test_images_with_sigma_and_separate_latents(tmp_path):
    torch.manual_seed(0)
    net = Denoiser([3, 8, 8], model_channels=8, num_blocks=1, attn_resolutions=[], channel_mult=[1, 2]).eval()
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dict(ema=net), f)
    data = write_image_zip(tmp_path / 'img.zip', 12, resolution=8)
    out = tmp_path / 'pot'
    res = _run(f'--network={tmp_path / "net.pkl"}', f'--data={data}', '--sigma=1.5', '--back-steps=2',
               '--num-targets=8', '--separate-targets', '--source=normal', '--solver-step=adam', f'--outdir={out}')
    assert res.exit_code == 0, res.output
    assert os.path.isfile(out / 'targets.pt')
    pot = potential_lib.load_potential(out / 'potential.pt')
    from sampling.diffusion import edm_sigma_schedule
    torch.testing.assert_close(pot['sigmas'], edm_sigma_schedule(2, 0.002, 1.5))
    assert pot['targets'].shape == (8, 3, 8, 8) and pot['source'] == 'normal' and pot['sigma'] == 1.5
    assert pot['solver']['settings']['step'] == 'adam'
    x, info = dpmot.generate_samples(net, range(3), pot, sampler='euler', topk=2)
    assert x.shape == (3, 3, 8, 8) and info['nfe'] == 2 and torch.isfinite(x).all()


@pytest.mark.parametrize('solver,stop', [('monte-carlo', 7), ('exact', 2)])
def test_resume_continues_exactly(tmp_path, vector_setup, solver, stop):
    pkl, data, _ = vector_setup
    common = [f'--network={pkl}', f'--data={data}', '--num-targets=16', '--tol=0', '--checkpoint-every=5',
              f'--solver={solver}']
    assert _run(*common, '--max-iters=12', f'--outdir={tmp_path / "full"}').exit_code == 0
    assert _run(*common, f'--max-iters={stop}', f'--outdir={tmp_path / "part"}').exit_code == 0
    res = _run(*common, '--max-iters=12', f'--outdir={tmp_path / "part"}')
    assert res.exit_code == 0 and f'Resume: from iteration {stop}' in res.output, res.output
    full = potential_lib.load_potential(tmp_path / 'full' / 'potential.pt')
    part = potential_lib.load_potential(tmp_path / 'part' / 'potential.pt')
    n = full['solver']['num_iters']
    assert part['solver']['num_iters'] == n and n == (12 if solver == 'monte-carlo' else n) and n > stop
    torch.testing.assert_close(part['h'], full['h'], rtol=1e-12, atol=1e-12)
    assert [r['iter'] for r in part['solver']['history']] == list(range(1, n + 1))


def test_rerun_after_convergence_and_checkpoints_of_other_runs(tmp_path, vector_setup):
    pkl, data, _ = vector_setup
    common = [f'--network={pkl}', f'--data={data}', '--num-targets=16', f'--outdir={tmp_path / "pot"}']
    assert _run(*common).exit_code == 0
    first = potential_lib.load_potential(tmp_path / 'pot' / 'potential.pt')
    res = _run(*common)                                  # converged: nothing more to do
    assert res.exit_code == 0 and 'Resume: from iteration' in res.output, res.output
    again = potential_lib.load_potential(tmp_path / 'pot' / 'potential.pt')
    assert torch.equal(again['h'], first['h']) and again['solver']['converged']
    res = _run(*common, '--seed=1')
    assert res.exit_code != 0 and 'checkpoint of another run' in res.output and 'seed' in res.output
    assert '--no-resume' in res.output
    assert _run(*common, '--seed=1', '--no-resume').exit_code == 0


@pytest.mark.parametrize('case', ['no-network', 'not-a-pickle', 'eot-snapshot', 'shape', 'back-steps', 'num-targets',
                                  'steps-and-sigma', 'sigma-range', 'no-data', 'bad-step', 'mc-option-exact'])
def test_bad_input_fails_before_any_output(tmp_path, vector_setup, case):
    pkl, data, _ = vector_setup
    args = dict(network=pkl, data=data, outdir=str(tmp_path / 'out'))
    extra = []
    if case == 'no-network':
        args['network'], expect = str(tmp_path / 'nope.pkl'), 'no such file'
    elif case == 'not-a-pickle':
        (tmp_path / 'bad.pkl').write_bytes(b'hello')
        args['network'], expect = str(tmp_path / 'bad.pkl'), 'not a readable network snapshot'
    elif case == 'eot-snapshot':
        with open(tmp_path / 'eot.pkl', 'wb') as f:
            pickle.dump(dict(G=1, f=2, D=3), f)
        args['network'], expect = str(tmp_path / 'eot.pkl'), '"ema"'
    elif case == 'shape':
        args['data'], expect = write_vector_npz(tmp_path / 'd3.npz', 8, dim=3), 'shape [3]'
    elif case == 'back-steps':
        extra, expect = ['--steps=4', '--back-steps=5'], '--back-steps=5 exceeds --steps=4'
    elif case == 'num-targets':
        extra, expect = ['--num-targets=65'], '--num-targets=65'
    elif case == 'steps-and-sigma':
        extra, expect = ['--steps=10', '--sigma=1'], 'exclude each other'
    elif case == 'sigma-range':
        extra, expect = ['--sigma=100'], '--sigma=100'
    elif case == 'no-data':
        args['data'], expect = str(tmp_path / 'nope.npz'), 'no such file'
    elif case == 'bad-step':
        extra, expect = ['--solver-step=nope'], "'nope' is not one of 'log', 'adam'"
    else:
        extra, expect = ['--solver-step=adam', '--lr=0.3'], ('--lr, --solver-step set(s) the Monte Carlo solver, but '
                                                            '--solver=auto picks exact for d = 2')
    res = CliRunner().invoke(potential.main, [f'--{k}={v}' for k, v in args.items()] + extra + ['--device=cpu'])
    assert res.exit_code != 0 and expect in res.output, res.output
    assert not os.path.exists(tmp_path / 'out')


def test_help_explains_every_option():
    res = CliRunner().invoke(potential.main, ['--help'])
    assert res.exit_code == 0
    for param in potential.main.params:
        assert param.help, param.name


@pytest.mark.parametrize('solver', ['monte-carlo', 'exact'])
def test_two_gloo_processes_give_the_single_process_answer(tmp_path, vector_setup, solver):
    pkl, data, _ = vector_setup
    common = [f'--network={pkl}', f'--data={data}', '--num-targets=16', '--max-iters=8', '--block-size=64',
              '--no-progress', '--device=cpu', f'--solver={solver}', '--tol=0' if solver == 'monte-carlo' else '--tol=0.2']
    assert CliRunner().invoke(potential.main, common + [f'--outdir={tmp_path / "one"}']).exit_code == 0
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'potential.py')
    torchrun(script, *common, f'--outdir={tmp_path / "two"}', nproc=2)
    one = potential_lib.load_potential(tmp_path / 'one' / 'potential.pt')
    two = potential_lib.load_potential(tmp_path / 'two' / 'potential.pt')
    assert two['provenance']['world_size'] == 2
    torch.testing.assert_close(two['h'], one['h'], rtol=1e-9, atol=1e-9)


def test_safe_export_of_the_denoiser_gives_the_same_potential(tmp_path, vector_setup):
    """A code-free export (generate.py --export-safe) loads with weights_only and solves identically."""

    pkl, data, net = vector_setup
    export = tmp_path / 'export'
    snapshots.export_safe(snapshots.load_network(pkl), str(export))
    common = [f'--data={data}', '--steps=10', '--back-steps=3', '--num-targets=16', '--seed=4']
    res_a = _run(f'--network={pkl}', f'--outdir={tmp_path / "a"}', *common)
    res_b = _run(f'--network={export}', f'--outdir={tmp_path / "b"}', *common)
    assert res_a.exit_code == 0 and res_b.exit_code == 0, res_a.output + res_b.output
    pa, pb = potential_lib.load_potential(tmp_path / 'a' / 'potential.pt'), potential_lib.load_potential(tmp_path / 'b' / 'potential.pt')
    assert torch.equal(pa['h'], pb['h']) and torch.equal(pa['targets'], pb['targets'])
    assert pa['provenance']['denoiser_sha256'] == pb['provenance']['denoiser_sha256']


def test_generate_passes_the_angle_threshold_to_top_k(tmp_path, vector_setup):
    """generate.py --topk --angle-threshold samples exactly as the library call with the same settings."""
    import generate
    pkl, data, net = vector_setup
    out = tmp_path / 'pot'
    assert _run(f'--network={pkl}', f'--data={data}', '--steps=10', '--back-steps=3', '--num-targets=16',
                f'--outdir={out}').exit_code == 0
    with open(pkl, 'rb') as f:
        loaded = pickle.load(f)['ema']
    pot = potential_lib.load_potential(out / 'potential.pt')
    outputs = {}
    for name, extra in (('cut', ['--angle-threshold=0']), ('default', [])):
        res = CliRunner().invoke(generate.main, [f'--network={pkl}', f'--potential={out / "potential.pt"}',
                                                 f'--outdir={tmp_path / name}', '--seeds=0-7', '--sampler=heun',
                                                 '--topk=3', '--device=cpu', *extra])
        assert res.exit_code == 0, res.output
        outputs[name] = np.load(tmp_path / name / 'samples.npz')['y']
    want_cut, _ = dpmot.generate_samples(loaded, range(8), pot, sampler='heun', topk=3, angle_threshold=0.0)
    want_default, _ = dpmot.generate_samples(loaded, range(8), pot, sampler='heun', topk=3)
    np.testing.assert_array_equal(outputs['cut'].reshape(8, -1), want_cut.numpy().reshape(8, -1))
    np.testing.assert_array_equal(outputs['default'].reshape(8, -1), want_default.numpy().reshape(8, -1))
    assert not np.array_equal(outputs['cut'], outputs['default'])
    res = CliRunner().invoke(generate.main, [f'--network={pkl}', f'--potential={out / "potential.pt"}',
                                             f'--outdir={tmp_path / "bad"}', '--seeds=0', '--angle-threshold=0.3'])
    assert res.exit_code != 0 and '--topk >= 2' in res.output and not os.path.exists(tmp_path / 'bad')


def test_unconverged_potential_is_refused_unless_accepted_and_generate_warns(tmp_path, vector_setup):
    """The Monte Carlo solver stopped after 2 iterations: no potential.pt, a message with the error reached, the
    tolerance and what to try; --accept-unconverged writes it, recorded as unconverged; generate.py warns."""
    import generate
    pkl, data, _ = vector_setup
    out = tmp_path / 'pot'
    common = [f'--network={pkl}', f'--data={data}', '--num-targets=16', '--solver=monte-carlo', f'--outdir={out}']
    res = _run(*common, '--max-iters=2')
    assert res.exit_code != 0, res.output
    assert 'NOT CONVERGED after 2 iterations: --max-iters=2 reached' in res.output
    assert '--tol=0.05' in res.output and '--solver=exact' in res.output and '--accept-unconverged' in res.output
    assert not os.path.exists(out / 'potential.pt') and os.path.isfile(out / potential.STATE_NAME)
    assert 'NOT CONVERGED' in open(out / 'log.txt').read()
    res = _run(*common, '--max-iters=3', '--accept-unconverged')
    assert res.exit_code == 0 and 'Resume: from iteration 2' in res.output and 'Writing it anyway' in res.output
    pot = potential_lib.load_potential(out / 'potential.pt')
    assert pot['solver']['converged'] is False and pot['solver']['num_iters'] == 3
    res = CliRunner().invoke(generate.main, [f'--network={pkl}', f'--potential={out / "potential.pt"}',
                                                             f'--outdir={tmp_path / "gen"}', '--seeds=0-3', '--device=cpu'])
    assert res.exit_code == 0, res.output
    assert 'WARNING' in res.stderr and 'NOT CONVERGED' in res.stderr and 'potential.py' in res.stderr
    # A converged potential gives no warning.
    assert _run(*common[:-1], f'--outdir={tmp_path / "good"}', '--solver=exact').exit_code == 0
    assert potential_lib.unconverged_warning(tmp_path / 'good' / 'potential.pt') is None


def test_exact_solver_refuses_high_dimensional_latents(tmp_path):
    net = Denoiser([3], model_channels=8, depth=1).eval()
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dict(ema=net), f)
    data = write_vector_npz(tmp_path / 'd.npz', 8, dim=3, seed=1)
    res = _run(f'--network={tmp_path / "net.pkl"}', f'--data={data}', '--solver=exact', f'--outdir={tmp_path / "ok"}')
    assert res.exit_code == 0, res.output                                        # d = 3 is fine
    net4 = Denoiser([4], model_channels=8, depth=1).eval()
    with open(tmp_path / 'net4.pkl', 'wb') as f:
        pickle.dump(dict(ema=net4), f)
    data4 = write_vector_npz(tmp_path / 'd4.npz', 8, dim=4, seed=1)
    res = _run(f'--network={tmp_path / "net4.pkl"}', f'--data={data4}', '--solver=exact', f'--outdir={tmp_path / "no"}')
    assert res.exit_code != 0 and '--solver=exact works for d <= 3' in res.output and 'd = 4' in res.output
    assert not os.path.exists(tmp_path / 'no')

#----------------------------------------------------------------------------
# NVlabs/edm conventions: the noise range clamped as edm's sampler clamps it, edm's option spellings, labels.

class EDMStandIn(torch.nn.Module):
    """A denoiser with NVlabs/edm's interface and defaults (sigma_min = 0, sigma_max = inf, label_dim,
    round_sigma), written here: only what potential.py reads."""

    def __init__(self, label_dim=0):
        super().__init__()
        self.data_shape, self.label_dim = [2], label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float('inf'), 0.5
        self.lin = torch.nn.Linear(2 + label_dim, 2)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        c = class_labels if self.label_dim else x[:, :0]
        return x + 0 * self.lin(torch.cat([x, c], dim=1))


def _edm_setup(tmp_path, label_dim=0, labels=True):
    with open(tmp_path / f'edm{label_dim}.pkl', 'wb') as f:
        pickle.dump(dict(ema=EDMStandIn(label_dim)), f)
    rng = np.random.default_rng(3)
    arrays = dict(x=rng.normal(size=(60, 2)).astype(np.float32))
    if labels:
        arrays['labels'] = rng.integers(0, 3, size=60).astype(np.int64)
    np.savez(tmp_path / 'labelled.npz', **arrays)
    return str(tmp_path / f'edm{label_dim}.pkl'), str(tmp_path / 'labelled.npz')


def test_edm_network_with_infinite_range_uses_edms_clamped_schedule(tmp_path):
    from sampling.diffusion import edm_sigma_schedule
    pkl, data = _edm_setup(tmp_path)
    common = [f'--network={pkl}', f'--data={data}', '--steps=10', '--back-steps=3', '--num-targets=12']
    res = _run(*common, f'--outdir={tmp_path / "a"}')
    assert res.exit_code == 0, res.output
    pot = potential_lib.load_potential(tmp_path / 'a' / 'potential.pt')
    torch.testing.assert_close(pot['sigmas'], edm_sigma_schedule(10, 0.002, 80.0), rtol=0, atol=0)
    # edm's spellings and the dash aliases give the same potential; the recorded command uses edm's.
    res = _run(*common, '--sigma_min=0.01', '--sigma_max=40', '--rho=5', f'--outdir={tmp_path / "b"}')
    assert res.exit_code == 0, res.output
    res = _run(*common, '--sigma-min=0.01', '--sigma-max=40', '--rho=5', f'--outdir={tmp_path / "c"}')
    b = potential_lib.load_potential(tmp_path / 'b' / 'potential.pt')
    c = potential_lib.load_potential(tmp_path / 'c' / 'potential.pt')
    torch.testing.assert_close(b['sigmas'], edm_sigma_schedule(10, 0.01, 40.0, 5.0), rtol=0, atol=0)
    assert torch.equal(b['sigmas'], c['sigmas']) and torch.equal(b['h'], c['h'])
    assert '--sigma_min=0.01' in b['provenance']['command'] and '--sigma_max=40.0' in b['provenance']['command']


def test_our_denoiser_clamps_a_smaller_sigma_min_to_its_own(tmp_path, vector_setup):
    from sampling.diffusion import edm_sigma_schedule
    pkl, data, _ = vector_setup
    res = _run(f'--network={pkl}', f'--data={data}', '--steps=6', '--back-steps=2', '--num-targets=8',
               '--sigma_min=0.0001', '--sigma_max=1000', f'--outdir={tmp_path / "pot"}')
    assert res.exit_code == 0, res.output
    pot = potential_lib.load_potential(tmp_path / 'pot' / 'potential.pt')
    torch.testing.assert_close(pot['sigmas'], edm_sigma_schedule(6, 0.002, 80.0), rtol=0, atol=0)


def test_latents_keep_their_labels_and_class_potentials(tmp_path):
    pkl, data = _edm_setup(tmp_path, label_dim=3)
    want = np.load(data)['labels']
    res = _run(f'--network={pkl}', f'--data={data}', '--num-targets=20', '--seed=2', f'--outdir={tmp_path / "all"}')
    assert res.exit_code == 0 and 'Labels: the network is class-conditional (3 labels)' in res.output, res.output
    raw = torch.load(tmp_path / 'all' / 'potential.pt', weights_only=True)
    assert raw['class_label'] is None and raw['labels'].dtype == torch.int64
    assert raw['labels'].tolist() == want[raw['indices'].numpy()].tolist()
    res = _run(f'--network={pkl}', f'--data={data}', '--class=1', f'--outdir={tmp_path / "one"}')
    assert res.exit_code == 0, res.output
    pot = potential_lib.load_potential(tmp_path / 'one' / 'potential.pt')
    assert pot['class_label'] == 1 and pot['labels'].tolist() == [1] * int((want == 1).sum())
    assert sorted(pot['indices'].tolist()) == np.flatnonzero(want == 1).tolist()
    # The potential of the first version has neither key; it loads with both None.
    old = potential_lib.load_potential(os.path.join(os.path.dirname(__file__), 'fixtures', 'v1', 'potential',
                                                    'potential.pt'))
    assert old['labels'] is None and old['class_label'] is None


@pytest.mark.parametrize('case', ['out-of-range', 'no-labels', 'unconditional', 'conditional-unlabelled',
                                  'too-many-targets'])
def test_class_bad_input_fails_before_any_output(tmp_path, case):
    label_dim = 0 if case == 'unconditional' else 3
    pkl, data = _edm_setup(tmp_path, label_dim=label_dim, labels=case not in ('no-labels', 'conditional-unlabelled'))
    extra = {'out-of-range': ['--class=3'], 'no-labels': ['--class=0'], 'unconditional': ['--class=0'],
             'conditional-unlabelled': [], 'too-many-targets': ['--class=2', '--num-targets=59']}[case]
    expect = {'out-of-range': '--class=3 is out of range: use 0 <= --class <= 2',
              'no-labels': '--class=0: --data has no labels', 'unconditional': 'the network is unconditional',
              'conditional-unlabelled': 'class-conditional (3 labels) but --data has no labels',
              'too-many-targets': 'items of class 2 in --data'}[case]
    res = _run(f'--network={pkl}', f'--data={data}', *extra, f'--outdir={tmp_path / "out"}')
    assert res.exit_code != 0 and expect in res.output, res.output
    assert not os.path.exists(tmp_path / 'out')

#----------------------------------------------------------------------------
# Hostile or mistaken paths (issue 20 items 8 and 13).

@pytest.mark.parametrize('case', ['a-file', 'under-a-file', 'unwritable'])
def test_bad_outdir_is_a_one_line_error(tmp_path, vector_setup, case):
    pkl, data, _ = vector_setup
    (tmp_path / 'file').write_text('x')
    outdir = {'a-file': tmp_path / 'file', 'under-a-file': tmp_path / 'file' / 'pot',
              'unwritable': tmp_path / 'ro' / 'pot'}[case]
    if case == 'unwritable':
        if os.geteuid() != 0:
            (tmp_path / 'ro').mkdir(mode=0o500)
        elif os.path.isdir('/sys/kernel'):
            outdir = '/sys/kernel/dpmot-pot'       # root passes every permission check; sysfs refuses the mkdir
        else:
            pytest.skip('running as root and no /sys to stand for a folder that cannot be written')
    res = _run(f'--network={pkl}', f'--data={data}', '--num-targets=8', f'--outdir={outdir}')
    assert res.exit_code != 0 and not isinstance(res.exception, OSError), repr(res.exception)
    assert res.output.startswith('Error: --outdir') and len(res.output.strip().splitlines()) == 1, res.output
    assert open(tmp_path / 'file').read() == 'x'


@pytest.mark.parametrize('where', ['absolute', 'parent', 'subfolder', 'symlink'])
def test_targets_path_outside_the_potentials_folder_is_not_followed(tmp_path, vector_setup, where):
    pkl, data, _ = vector_setup
    out = tmp_path / 'pot'
    assert _run(f'--network={pkl}', f'--data={data}', '--num-targets=8', '--separate-targets',
                f'--outdir={out}').exit_code == 0
    pot = torch.load(out / 'potential.pt', weights_only=True)
    elsewhere = tmp_path / 'elsewhere' / 'targets.pt'
    elsewhere.parent.mkdir()
    os.replace(out / 'targets.pt', elsewhere)
    if where == 'symlink':
        os.symlink(elsewhere, out / 'targets.pt')
        pot['targets_path'] = 'targets.pt'
    else:
        pot['targets_path'] = {'absolute': str(elsewhere), 'parent': '../elsewhere/targets.pt',
                               'subfolder': 'sub/targets.pt'}[where]
        if where == 'subfolder':
            (out / 'sub').mkdir()
            os.symlink(elsewhere, out / 'sub' / 'targets.pt')
    torch.save(pot, out / 'potential.pt')
    with pytest.raises(potential_lib.PotentialError, match='beside the potential'):
        potential_lib.load_potential(out / 'potential.pt')
    with pytest.raises(ValueError, match='beside the potential'):
        potential_lib.save_potential(tmp_path / 'p.pt', h=pot['h'], sigmas=pot['sigmas'], back_steps=pot['back_steps'],
                                     source='uniform', data_shape=[2], score_gap=1.0, targets=torch.zeros(8, 2),
                                     targets_path=tmp_path / 'elsewhere' / 't.pt')
