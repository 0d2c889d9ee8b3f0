"""Side-by-side speed of the semi-discrete OT solver: ours vs. the reference (AE-OT / DPM-OT) algorithm.

Both solve the same problem (uniform source on [0,1]^d, N image-like targets: smooth random images in [-1,1]
plus Gaussian noise of a DPM-OT sigma, or images from a dataset zip/folder) and are judged by one rule: the
debiased rms relative cell-mass error on an independent evaluation sample (fixed seed, float32 scoring,
never used to fit) <= --target-rms with no empty cell. Evaluations run with the clock stopped (on
--eval-threads threads): ours every --eval-every iterations and every iteration once its averaged heights
could be at the target, the reference every --ref-eval-every iterations and at its time limit. The script
prints the time each method needs, their ratio, and the assignment kernel's GFLOP/s as a share of this
machine's matmul peak measured in the same run.

Where the reference cannot be run to the end (at N = 10000 on a CPU one of its iterations takes a minute),
the script also prints a lower bound on its time: the fewest iterations after which its heights can be
accurate at all (Adam bounds how far a height moves per iteration, and accurate heights are far from its
start h = 0; see reference_min_iterations) times the fastest of its measured iterations.

Quick run (minutes on 2 CPU cores):
    python -m benchmarks.semidiscrete_speed --num-targets=1000 --res=32 --max-seconds=1200
Full size from the issue (about two hours on 2 CPU cores, most of it evaluations and the reference):
    OMP_NUM_THREADS=1 python -m benchmarks.semidiscrete_speed --num-targets=10000 --res=32 --eval-every=1000 \
        --ref-eval-every=100000 --max-seconds=5400 --ref-max-seconds=1800
Ours on a GPU (the problem, the peaks and the kernel on the device; the reference is not run there):
    python -m benchmarks.semidiscrete_speed --device=cuda --num-targets=50000 --skip-reference --eval-every=1000
"""

import dataclasses
import math
import os
import time

import click
import torch

from torch_utils import distributed as dist_utils
from transport import semidiscrete as sd

#----------------------------------------------------------------------------
# Targets.

def smooth_random_images(num, res, sigma, seed):
    """[num, 3 res^2] smooth random images in [-1, 1] (a few modes, varied contrast) plus N(0, sigma^2) noise."""
    gen = torch.Generator().manual_seed(seed)
    modes = torch.randn(10, 3, 8, 8, generator=gen) * 1.2
    label = torch.multinomial(torch.rand(10, generator=gen) + 0.2, num, replacement=True, generator=gen)
    z = modes[label] + 0.6 * torch.randn(num, 3, 8, 8, generator=gen) * (0.5 + torch.rand(num, 1, 1, 1, generator=gen))
    img = torch.nn.functional.interpolate(z, size=(res, res), mode='bilinear', align_corners=False).tanh()
    return (img + sigma * torch.randn(img.shape, generator=gen)).reshape(num, -1)


def dataset_images(path, num, res, sigma, seed):
    """[num, 3 res^2] images from a zip or folder of PNG/JPEG files, scaled to [-1, 1], plus noise."""
    import io
    import zipfile
    import numpy as np
    from PIL import Image
    exts = ('.png', '.jpg', '.jpeg')
    if os.path.isdir(path):
        names = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(exts))
        read = lambda n: open(n, 'rb').read()
    else:
        zf = zipfile.ZipFile(path)
        names = sorted(n for n in zf.namelist() if n.lower().endswith(exts))
        read = zf.read
    if len(names) < num:
        raise click.ClickException(f'{path} holds {len(names)} images but --num-targets={num}; use fewer targets')
    out = []
    for n in names[:num]:
        img = Image.open(io.BytesIO(read(n))).convert('RGB').resize((res, res), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    x = torch.stack(out)
    gen = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=gen)).reshape(num, -1)

#----------------------------------------------------------------------------
# The reference algorithm (AE-OT, as used by DPM-OT), re-implemented from its description.

class ReferenceSolver:
    """h = 0; every source batch of torch.rand samples is scored against every target block (uncentred
    scores y x + h), block maxima are stacked and reduced; Adam (no bias correction, betas 0.9 / 0.999,
    eps 1e-8, lr 0.1) on h, re-centred to mean 0; 10 N samples per iteration; the sample count doubles
    (and lr shrinks by 0.8) after 50 iterations without a new best gradient norm, at most 3 times; it stops
    when the gradient norm < 8e-4 and no cell is empty."""

    def __init__(self, y, lr=0.1, bat_size_sr=4000, bat_size_tg=1000, seed=0):
        self.y, self.N = y, y.shape[0]
        self.lr, self.bat_sr, self.bat_tg = lr, bat_size_sr, min(bat_size_tg, self.N)
        self.num_bat_sr = max(1, 10 * self.N // self.bat_sr)
        self.h = torch.zeros(self.N)
        self.m = torch.zeros(self.N)
        self.v = torch.zeros(self.N)
        self.best, self.bad, self.doubled, self.iter = math.inf, 0, 0, 0
        self.first_doubling = None      # iterations done before the sample count first doubled
        self.gen = torch.Generator().manual_seed(seed)
        self.stopped = False

    def _batch_counts(self):
        x = torch.rand(self.bat_sr, self.y.shape[1], generator=self.gen)
        best_v = torch.full((self.bat_sr,), -1e30)
        best_i = torch.full((self.bat_sr,), -1, dtype=torch.int64)
        ar = torch.arange(self.bat_sr)
        for s in range(0, self.N, self.bat_tg):
            u = self.y[s:s + self.bat_tg] @ x.T + self.h[s:s + self.bat_tg, None]    # [block, batch]
            v, i = u.max(dim=0)
            best_v, pick = torch.stack([best_v, v]).max(dim=0)
            best_i = torch.stack([best_i, i + s])[pick, ar]
        return torch.bincount(best_i, minlength=self.N)

    def step(self):
        counts = sum(self._batch_counts() for _ in range(self.num_bat_sr))
        grad = counts.float() / (self.num_bat_sr * self.bat_sr) - 1.0 / self.N
        self.m.mul_(0.9).add_(0.1 * grad)
        self.v.mul_(0.999).add_(0.001 * grad * grad)
        self.h -= self.lr * self.m / (self.v.sqrt() + 1e-8)
        self.h -= self.h.mean()
        g_norm = float(grad.norm())
        self.iter += 1
        if g_norm < self.best:
            self.best, self.bad = g_norm, 0
        else:
            self.bad += 1
        if g_norm < 8e-4 and int((counts == 0).sum()) == 0:
            self.stopped = True
        if self.bad > 50 and self.doubled < 3:
            self.first_doubling = self.first_doubling or self.iter
            self.num_bat_sr *= 2
            self.best, self.bad = math.inf, 0
            self.lr *= 0.8
            self.doubled += 1
        return g_norm

#----------------------------------------------------------------------------
# A lower bound on the reference's iterations, for problems too large to run it to the end.
#
# Adam (no bias correction) moves each height by lr * |m_t| / (sqrt(v_t) + eps) per iteration. By Cauchy-Schwarz
# on the two exponential sums, |m_t| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b2) * sqrt(sum_{j<t} (b1^2 / b2)^j)
# whatever the gradients are (<= 7.27 for 0.9 / 0.999), so a height difference h_i - h_j changes by at most
# twice that times lr per iteration (re-centring moves every height alike, and lr only shrinks). From h = 0,
# an accurate h must have changed some differences a lot: with g_i = h_i + <1/2, y_i> (the centred heights),
# a cell of true mass >= theta / N forces |g_i - g_j| <= kappa |y_i - y_j| for every j, kappa =
# sqrt(ln(N / theta) / 6), because <x - 1/2, y_i - y_j> is sub-Gaussian with variance proxy |y_i - y_j|^2 / 12
# for x uniform on the cube (sinh(z) / z <= exp(z^2 / 6)). A true rms relative error <= rms leaves at most
# k = N rms^2 / (1 - theta)^2 cells below theta / N (Chebyshev), so such cells are among the k + 1 with the
# lowest <1/2, y_i> and among the k + 1 with the highest, and |h_i - h_j| >= <1/2, y_j - y_i> - kappa |y_i - y_j|
# for one pair from those two sets.

def adam_step_bound(t, beta1=0.9, beta2=0.999):
    """The largest |m_t| / sqrt(v_t) that Adam without bias correction can reach at iteration t (t >= 1)."""
    q = beta1 ** 2 / beta2
    return (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt((1 - q ** t) / (1 - q))


def required_height_change(y, target_rms, thetas=(0.9, 0.75, 0.5, 0.25, 0.1, 0.01, 0.001)):
    """Lower bound on max_ij |h_i - h_j| for heights of the uniform-source problem whose true rms relative
    cell-mass error is <= target_rms (see the comment above). Returns (bound, theta that gave it)."""
    N = y.shape[0]
    v = 0.5 * y.double().sum(dim=1)
    order = v.argsort()
    best = (0.0, None)
    for theta in thetas:
        k = math.floor(N * target_rms ** 2 / (1 - theta) ** 2)
        if 2 * (k + 1) > N:
            continue
        lo, hi = order[:k + 1], order[N - k - 1:]
        kappa = math.sqrt(math.log(N / theta) / 6)
        dist = torch.cdist(y[hi].double(), y[lo].double())
        bound = float((v[hi][:, None] - v[lo][None, :] - kappa * dist).min())
        if bound > best[0]:
            best = (bound, theta)
    return best


def reference_min_iterations(y, target_rms, lr=0.1, beta1=0.9, beta2=0.999):
    """Fewest iterations after which the reference (started at h = 0) can be within target_rms.

    Returns (iterations, required change of a height difference, theta of that bound)."""
    need, theta = required_height_change(y, target_rms)
    moved, t = 0.0, 0
    while moved < need:
        t += 1
        moved += 2 * lr * adam_step_bound(t, beta1, beta2)
    return t, need, theta

#----------------------------------------------------------------------------
# Timing.

def evaluate(prob, h, num_samples, threads):
    """sd.evaluate on the fixed evaluation seed, with `threads` threads (the race's clock is stopped)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return sd.evaluate(prob, h, num_samples, torch.Generator().manual_seed(12345))
    finally:
        torch.set_num_threads(old)


def race(name, step_fn, h_fn, prob, target_rms, should_eval, eval_samples, eval_threads, max_seconds, log):
    """Run step_fn() until the evaluation of h_fn() reaches target_rms with no empty cell.

    Evaluates after iteration `it` when should_eval(it), when step_fn() says it is done, and once more at the
    time limit. Returns (seconds or None, iterations, last evaluation, seconds of each iteration). The clock
    runs only inside step_fn.
    """
    spent, it, ev, step_times, fresh = 0.0, 0, None, [], False

    def check():
        ev = evaluate(prob, h_fn(), eval_samples, eval_threads)
        log(f'{name:>9s} iter {it:4d}  {spent:8.1f} s  eval rms {ev["rms"]:.4f}  max|r| {ev["max_abs"]:.3f} '
            f'(floor {ev["noise_floor"]:.3f})  empty {ev["empty"]}')
        return ev, ev['rms'] <= target_rms and ev['empty'] == 0

    while spent < max_seconds:
        t0 = time.perf_counter()
        done = step_fn()
        step_times.append(time.perf_counter() - t0)
        spent += step_times[-1]
        it += 1
        fresh = should_eval(it) or bool(done)
        if fresh:
            ev, reached = check()
            if reached:
                return spent, it, ev, step_times
        if done == 'stop':
            break
    if it and not fresh:
        ev, reached = check()
        if reached:
            return spent, it, ev, step_times
    return None, it, ev, step_times


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def matmul_peak(dtype, m=2048, n=4096, k=3072, reps=5, device=torch.device('cpu')):
    """GFLOP/s of a plain large matmul in `dtype` (best of reps; on a GPU each rep times 20 products in a row,
    since one takes about as long as the launch and the synchronisation)."""
    a, b = torch.randn(m, k).to(device, dtype), torch.randn(n, k).to(device, dtype)
    inner = 20 if device.type == 'cuda' else 1
    a @ b.T
    best = math.inf
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b.T
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * m * n * k / best / 1e9


def kernel_rate(prob, dtype, num_samples, block_size, chunk_size, reps=3):
    """GFLOP/s of our assignment kernel (top-2 per sample over all targets, re-scoring included)."""
    scorer = sd._Scorer(prob, dtype=dtype, chunk_size=chunk_size)
    g = torch.zeros(prob.num_targets, dtype=prob._exact, device=prob.device)
    x = (torch.rand(num_samples, prob.dim) - 0.5).to(prob.device)
    scorer.topk(x[:block_size], g, 2, exact='winner')      # warm-up
    best = math.inf
    for _ in range(reps):
        _sync(prob.device)
        t0 = time.perf_counter()
        for s in range(0, num_samples, block_size):
            scorer.topk(x[s:s + block_size], g, 2, exact='winner')
        _sync(prob.device)
        best = min(best, time.perf_counter() - t0)
    return 2 * num_samples * prob.num_targets * prob.dim / best / 1e9


def reference_rate(ref, reps=2):
    """GFLOP/s of the reference's scoring (one source batch against every target block)."""
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        ref._batch_counts()
        best = min(best, time.perf_counter() - t0)
    return 2 * ref.bat_sr * ref.N * ref.y.shape[1] / best / 1e9


def _device(choice, skip_reference):
    """The torch.device of --device; click.BadParameter for one torch cannot use, or a GPU with the reference."""
    try:
        device = dist_utils.resolve_device(choice)
    except (RuntimeError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint='--device')
    if device.type != 'cpu' and not skip_reference:
        raise click.BadParameter(f'--device={choice}: the reference runs on the CPU only; add --skip-reference')
    return device

#----------------------------------------------------------------------------


def log(msg):
    print(msg, flush=True)

#----------------------------------------------------------------------------

@click.command()
@click.option('--num-targets', help='N targets', type=int, default=10000, show_default=True)
@click.option('--res', help='Image resolution (d = 3 res^2)', type=int, default=32, show_default=True)
@click.option('--sigma', help='DPM-OT noise level of the target latents', type=float, default=0.1, show_default=True)
@click.option('--dataset', help='Zip or folder of images instead of synthetic targets', type=str, default=None)
@click.option('--target-rms', help='Debiased rms relative cell-mass error to reach', type=float, default=0.05, show_default=True)
@click.option('--eval-every', help='Iterations between evaluations of ours (also every iteration once its averaged heights could be at the target)', type=int, default=5, show_default=True)
@click.option('--ref-eval-every', help='Iterations between evaluations of the reference', type=int, default=25, show_default=True)
@click.option('--eval-per-target', help='Evaluation samples per target', type=int, default=100, show_default=True)
@click.option('--max-seconds', help='Time limit of ours, and of the reference unless --ref-max-seconds (solver time)', type=float, default=7200, show_default=True)
@click.option('--ref-max-seconds', help='Time limit of the reference (solver time)  [default: --max-seconds]', type=float, default=None)
@click.option('--dtype', help='Our scoring dtype', type=click.Choice(['bf16', 'fp32']), default='bf16', show_default=True)
@click.option('--chunk-size', help='Our targets per chunk', type=int, default=4096, show_default=True)
@click.option('--block-size', help='Our samples per block', type=int, default=2048, show_default=True)
@click.option('--kernel-targets', help='Also measure the kernel at this many targets', type=int, default=10000, show_default=True)
@click.option('--eval-threads', help='Threads for evaluations (clock stopped)  [default: all cores]', type=int, default=None)
@click.option('--skip-reference', help='Time only our solver', is_flag=True)
@click.option('--seed', help='Seed of the targets and solvers', type=int, default=0, show_default=True)
@click.option('--device', help='Where ours runs: cpu, cuda or cuda:N (the reference runs on the CPU only)', default='cpu', show_default=True)
def main(num_targets, res, sigma, dataset, target_rms, eval_every, ref_eval_every, eval_per_target, max_seconds,
         ref_max_seconds, dtype, chunk_size, block_size, kernel_targets, eval_threads, skip_reference, seed, device):
    """Time ours and the reference to the same accuracy on the same problem; print the ratio."""
    device = _device(device, skip_reference)
    N, d = num_targets, 3 * res * res
    y = dataset_images(dataset, N, res, sigma, seed) if dataset else smooth_random_images(N, res, sigma, seed)
    prob = sd.SemidiscreteProblem(y.to(device), 'uniform')
    tdtype = torch.bfloat16 if dtype == 'bf16' else torch.float32
    log(f'N = {N}, d = {d}, sigma = {sigma}, threads = {torch.get_num_threads()}, target: rms <= {target_rms} '
        f'and no empty cell on {eval_per_target} N independent samples')
    peak32 = report_kernels(prob, tdtype, dtype, kernel_targets, res, sigma, seed, block_size, chunk_size, device)
    race_kw = dict(target_rms=target_rms, eval_samples=eval_per_target * N,
                   eval_threads=eval_threads or os.cpu_count() or 1)
    solver = sd.SemidiscreteSolver(max_iters=0, tol=target_rms, dtype=tdtype, chunk_size=chunk_size,
                                   block_size=block_size)
    t_ours = race_ours(prob, solver, seed, eval_every, max_seconds, **race_kw)
    if device.type == 'cuda':
        log(f'peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated')
    if skip_reference:
        return
    ref_max_seconds = max_seconds if ref_max_seconds is None else ref_max_seconds
    race_reference(prob, y, seed, peak32, ref_eval_every, ref_max_seconds, t_ours, **race_kw)


def report_kernels(prob, tdtype, dtype, kernel_targets, res, sigma, seed, block_size, chunk_size, device):
    """Log the matmul peaks and our kernel's rate at N (and --kernel-targets) targets; returns the fp32 peak."""
    peak32, peak16 = matmul_peak(torch.float32, device=device), matmul_peak(torch.bfloat16, device=device)
    peak = peak16 if tdtype == torch.bfloat16 else peak32
    log(f'matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s')
    N = prob.num_targets
    for n_k in sorted({N, kernel_targets or N}):
        prob_k = prob if n_k == N else sd.SemidiscreteProblem(smooth_random_images(n_k, res, sigma, seed + 1).to(device))
        rate = kernel_rate(prob_k, tdtype, 2 * block_size, block_size, chunk_size)
        log(f'our kernel at N = {n_k} ({dtype}, top-2 with the winner exact): {rate:.0f} GFLOP/s = '
            f'{100 * rate / peak:.0f}% of the {dtype} peak')
    return peak32


def race_ours(prob, solver, seed, eval_every, max_seconds, *, target_rms, eval_samples, eval_threads):
    """Race our solver one iteration at a time (resuming its state); returns its time or None."""
    N = prob.num_targets
    box = dict(out=None)

    def ours_step():
        prev = box['out']
        one_more = dataclasses.replace(solver, max_iters=(prev.num_iters if prev else 0) + 1)
        box['out'] = one_more(prob, generator=torch.Generator().manual_seed(seed), resume=prev.state if prev else None)
        _sync(prob.device)
        return box['out'].converged

    def ours_should_eval(it):
        # Every --eval-every iterations, and every iteration once the averaged heights' own noise floor
        # sqrt(N / (3/4 of the samples averaged)) is within 10% of the target (skipping earlier ones can only
        # make our time longer).
        avg = box['out'].state['avg_samples']
        return it % eval_every == 0 or (avg > 0 and math.sqrt(N / (0.75 * avg)) <= 1.1 * target_rms)

    t_ours, it_ours, _, _ = race('ours', ours_step, lambda: box['out'].h, prob, target_rms, ours_should_eval,
                                 eval_samples, eval_threads, max_seconds, log)
    out = box['out']
    log(f'ours: {"reached" if t_ours else "did not reach"} the target in {t_ours or math.nan:.1f} s, {it_ours} iterations, '
        f'{out.num_samples_used / N:.0f} N samples; own certificate: converged={out.converged}')
    return t_ours


def race_reference(prob, y, seed, peak32, ref_eval_every, ref_max_seconds, t_ours, *, target_rms, eval_samples,
                   eval_threads):
    """Race the reference (with its lower bound) and log the result line against our time t_ours."""
    ref = ReferenceSolver(y, seed=seed)
    ref_rate = reference_rate(ref)
    log(f'reference kernel (fp32, stack-and-max): {ref_rate:.0f} GFLOP/s = {100 * ref_rate / peak32:.0f}% of the '
        f'fp32 peak')
    min_iters, need, theta = reference_min_iterations(y, target_rms, lr=ref.lr)
    log(f'reference lower bound: from h = 0 some height difference must change by >= {need:.1f} (cells of mass '
        f'>= {theta} / N), and Adam moves one by <= {2 * ref.lr * adam_step_bound(10**6):.3f} per iteration: '
        f'>= {min_iters} iterations')

    def ref_step():
        ref.step()
        return 'stop' if ref.stopped else False

    t_ref, it_ref, ev_ref, ref_times = race('reference', ref_step, lambda: ref.h, prob, target_rms,
                                            lambda it: it % ref_eval_every == 0, eval_samples, eval_threads,
                                            ref_max_seconds, log)
    if ref.stopped:
        log(f'reference stopped by its own rule (grad norm < 8e-4) at iteration {ref.iter}')
    # Every iteration scores at least 10 N samples, as the first ones did: the fastest of those times the
    # bound on the iterations is a lower bound on the reference's time.
    base_times = ref_times[:ref.first_doubling or len(ref_times)]
    ref_bound = min_iters * min(base_times) if base_times else 0.0
    if t_ref is None:
        log(f'reference did not reach the target within {ref_max_seconds:.0f} s ({it_ref} iterations, '
            f'{min(base_times):.3g}-{max(base_times):.3g} s each; last eval rms {ev_ref["rms"]:.3f}, '
            f'{ev_ref["empty"]} empty cells); bound: >= {min_iters} iterations x {min(base_times):.3g} s = '
            f'{ref_bound:.0f} s')
    if t_ours and t_ref:
        log(f'RESULT: ours {t_ours:.1f} s, reference {t_ref:.1f} s, speed-up {t_ref / t_ours:.1f}x')
    elif t_ours:
        spent_ref = sum(ref_times)
        log(f'RESULT: ours {t_ours:.1f} s; reference > {spent_ref:.0f} s measured (speed-up > '
            f'{spent_ref / t_ours:.1f}x) and >= {ref_bound:.0f} s by the bound (speed-up >= {ref_bound / t_ours:.1f}x)')
    else:
        log('RESULT: ours did not reach the target; no ratio')


if __name__ == '__main__':
    main()
