"""Side-by-side speed of the semi-discrete OT solver: ours vs. the reference (AE-OT / DPM-OT) algorithm.

Both solve the same problem (uniform source on [0,1]^d, N image-like targets: smooth random images in [-1,1]
plus Gaussian noise of a DPM-OT sigma, or images from a dataset zip/folder) and are judged by one rule: the
debiased rms relative cell-mass error on an independent evaluation sample (fixed seed, float32 scoring,
never used to fit) <= --target-rms with no empty cell. Evaluation runs every --eval-every iterations with
the clock stopped. The script prints the time each method needs, their ratio, and the assignment kernel's
GFLOP/s as a share of this machine's matmul peak measured in the same run.

Quick run (minutes on 2 CPU cores):
    python benchmarks/semidiscrete_speed.py --num-targets=1000 --res=32 --max-seconds=1200
Full size from the issue (hours on CPU):
    python benchmarks/semidiscrete_speed.py --num-targets=10000 --res=32
"""

import dataclasses
import math
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..')))

from training import semidiscrete as sd         # noqa: E402

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
            self.num_bat_sr *= 2
            self.best, self.bad = math.inf, 0
            self.lr *= 0.8
            self.doubled += 1
        return g_norm

#----------------------------------------------------------------------------
# Timing.

def race(name, step_fn, h_fn, prob, target_rms, eval_every, eval_samples, max_seconds, log):
    """Run step_fn() until the evaluation of h_fn() reaches target_rms with no empty cell.

    Returns (seconds or None, iterations, last evaluation). The clock runs only inside step_fn.
    """
    spent, it, ev = 0.0, 0, None
    while spent < max_seconds:
        t0 = time.perf_counter()
        done = step_fn()
        spent += time.perf_counter() - t0
        it += 1
        if it % eval_every == 0 or done:
            ev = sd.evaluate(prob, h_fn(), eval_samples, torch.Generator().manual_seed(12345))
            log(f'{name:>9s} iter {it:4d}  {spent:8.1f} s  eval rms {ev["rms"]:.4f}  max|r| {ev["max_abs"]:.3f} '
                f'(floor {ev["noise_floor"]:.3f})  empty {ev["empty"]}')
            if ev['rms'] <= target_rms and ev['empty'] == 0:
                return spent, it, ev
        if done == 'stop':
            break
    return None, it, ev


def matmul_peak(dtype, m=2048, n=4096, k=3072, reps=5):
    """GFLOP/s of a plain large matmul in `dtype` (best of reps)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    a @ b.T
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2 * m * n * k / best / 1e9


def kernel_rate(prob, dtype, num_samples, block_size, chunk_size, reps=3):
    """GFLOP/s of our assignment kernel (top-2 per sample over all targets, re-scoring included)."""
    scorer = sd._Scorer(prob, dtype=dtype, chunk_size=chunk_size)
    g = torch.zeros(prob.num_targets, dtype=prob._exact)
    x = torch.rand(num_samples, prob.dim) - 0.5
    scorer.topk(x[:block_size], g, 2, exact='winner')      # warm-up
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for s in range(0, num_samples, block_size):
            scorer.topk(x[s:s + block_size], g, 2, exact='winner')
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

#----------------------------------------------------------------------------

@click.command()
@click.option('--num-targets', help='N targets', type=int, default=10000, show_default=True)
@click.option('--res', help='Image resolution (d = 3 res^2)', type=int, default=32, show_default=True)
@click.option('--sigma', help='DPM-OT noise level of the target latents', type=float, default=0.1, show_default=True)
@click.option('--dataset', help='Zip or folder of images instead of synthetic targets', type=str, default=None)
@click.option('--target-rms', help='Debiased rms relative cell-mass error to reach', type=float, default=0.05, show_default=True)
@click.option('--eval-every', help='Iterations between evaluations of ours', type=int, default=5, show_default=True)
@click.option('--ref-eval-every', help='Iterations between evaluations of the reference', type=int, default=25, show_default=True)
@click.option('--eval-per-target', help='Evaluation samples per target', type=int, default=100, show_default=True)
@click.option('--max-seconds', help='Time limit per method (solver time)', type=float, default=7200, show_default=True)
@click.option('--dtype', help='Our scoring dtype', type=click.Choice(['bf16', 'fp32']), default='bf16', show_default=True)
@click.option('--chunk-size', help='Our targets per chunk', type=int, default=4096, show_default=True)
@click.option('--block-size', help='Our samples per block', type=int, default=2048, show_default=True)
@click.option('--kernel-targets', help='Also measure the kernel at this many targets', type=int, default=10000, show_default=True)
@click.option('--skip-reference', help='Time only our solver', is_flag=True)
@click.option('--seed', help='Seed of the targets and solvers', type=int, default=0, show_default=True)
def main(num_targets, res, sigma, dataset, target_rms, eval_every, ref_eval_every, eval_per_target, max_seconds, dtype, chunk_size,
         block_size, kernel_targets, skip_reference, seed):
    """Time ours and the reference to the same accuracy on the same problem; print the ratio."""
    log = lambda msg: print(msg, flush=True)
    N, d = num_targets, 3 * res * res
    y = dataset_images(dataset, N, res, sigma, seed) if dataset else smooth_random_images(N, res, sigma, seed)
    prob = sd.SemidiscreteProblem(y, 'uniform')
    tdtype = torch.bfloat16 if dtype == 'bf16' else torch.float32
    log(f'N = {N}, d = {d}, sigma = {sigma}, threads = {torch.get_num_threads()}, target: rms <= {target_rms} '
        f'and no empty cell on {eval_per_target} N independent samples')

    # Kernel throughput against the machine's peak, measured now (also at --kernel-targets targets).
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    peak = peak16 if tdtype == torch.bfloat16 else peak32
    log(f'matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s')
    for n_k in sorted({N, kernel_targets or N}):
        prob_k = prob if n_k == N else sd.SemidiscreteProblem(smooth_random_images(n_k, res, sigma, seed + 1))
        rate = kernel_rate(prob_k, tdtype, 2 * block_size, block_size, chunk_size)
        log(f'our kernel at N = {n_k} ({dtype}, top-2 with the winner exact): {rate:.0f} GFLOP/s = '
            f'{100 * rate / peak:.0f}% of the {dtype} peak')

    eval_samples = eval_per_target * N
    solver = sd.SemidiscreteSolver(max_iters=0, tol=target_rms, dtype=tdtype, chunk_size=chunk_size,
                                   block_size=block_size)
    box = dict(out=None)

    def ours_step():
        prev = box['out']
        one_more = dataclasses.replace(solver, max_iters=(prev.num_iters if prev else 0) + 1)
        box['out'] = one_more(prob, generator=torch.Generator().manual_seed(seed),
                                                      resume=prev.state if prev else None)
        return box['out'].converged

    t_ours, it_ours, ev_ours = race('ours', ours_step, lambda: box['out'].h, prob, target_rms, eval_every,
                                    eval_samples, max_seconds, log)
    out = box['out']
    log(f'ours: {"reached" if t_ours else "did not reach"} the target in {t_ours or math.nan:.1f} s, {it_ours} iterations, '
        f'{out.num_samples_used / N:.0f} N samples; own certificate: converged={out.converged}')

    if skip_reference:
        return
    ref = ReferenceSolver(y, seed=seed)
    ref_rate = reference_rate(ref)
    log(f'reference kernel (fp32, stack-and-max): {ref_rate:.0f} GFLOP/s = {100 * ref_rate / peak32:.0f}% of the '
        f'fp32 peak')

    def ref_step():
        ref.step()
        return 'stop' if ref.stopped else False

    t_ref, it_ref, ev_ref = race('reference', ref_step, lambda: ref.h, prob, target_rms, ref_eval_every, eval_samples,
                                 max_seconds, log)
    if ref.stopped:
        log(f'reference stopped by its own rule (grad norm < 8e-4) at iteration {ref.iter}')
    if t_ref is None:
        log(f'reference did not reach the target within {max_seconds:.0f} s ({it_ref} iterations; last eval rms '
            f'{ev_ref["rms"]:.3f}, {ev_ref["empty"]} empty cells)')
    if t_ours and t_ref:
        log(f'RESULT: ours {t_ours:.1f} s, reference {t_ref:.1f} s, speed-up {t_ref / t_ours:.1f}x')
    elif t_ours:
        log(f'RESULT: ours {t_ours:.1f} s, reference > {max_seconds:.0f} s: speed-up > {max_seconds / t_ours:.1f}x')
    else:
        log('RESULT: ours did not reach the target; no ratio')


if __name__ == '__main__':
    main()
