"""One-step EOT as a task of the shared training loop (training/loop.py): datasets, networks G, f, D and
one outer iteration, figures and FID at snapshots."""

import contextlib
import json
import os
import time

import numpy as np
import torch

import dnnlib
from metrics import detector as detector_lib
from metrics import fid as fid_lib
from models.eot_loss import G_LOSSES
from sampling import snapshots, translation
from sampling.rng import StackedRandomGenerator, repeat_seeds
from torch_utils import distributed as dist
from torch_utils import images
from torch_utils import misc
from torch_utils import training_stats
from torch_utils.images import to_model_space, to_uint8
from training.trainer import DataStream, cpu_copy

#----------------------------------------------------------------------------

V_INIT_ITEMS = 4096 # The light G-step's potential seeds its means among this many target items (LightPotential.init_from).

def check_step_options(G_loss, reuse_G_output, share_passes):
    """Refuse the step options that do not go together (ValueError naming the EOTTask argument and train.py's
    option): reusing G's outputs with the light G-step, sharing passes without reusing G's outputs."""
    if reuse_G_output and G_loss == 'light':
        raise ValueError('reuse_G_output (train.py --reuse-g-output=1) applies to the G-steps with a critic '
                         '(--g-loss=stated or kinetic); --g-loss=light has no G outputs for f or D to reuse: drop one '
                         'of them')
    if share_passes and not reuse_G_output:
        raise ValueError('share_passes (train.py --share-passes=1) shares the G-step\'s passes with the f- and '
                         'D-steps that reuse its outputs: it needs reuse_G_output=True (add --reuse-g-output=1, or '
                         'drop --share-passes)')

@contextlib.contextmanager
def frozen(params):
    """Temporarily disable the gradients of `params` (of networks used but not trained in a phase)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)

class EOTTask:
    """One-step EOT in the shared training loop: datasets, networks G, f, D and one outer iteration.

    One iteration: `G_iters` x (`f_iters` f-steps, one G-step), then `D_iters` D-steps; every step
    draws fresh batches. G runs under no_grad in f- and D-steps (no graph through G there), and f and
    D are called outside their DDP wrappers with frozen parameters in the G-step (they get no gradients).
    With `reuse_G_output` an iteration is `G_iters` x (one G-step, `f_iters` f-steps), then `D_iters` D-steps,
    and the f- and D-steps take the latest G-step's inputs x0 and its outputs (detached) instead of a batch of
    their own and a G pass under no_grad: one G pass per G-step instead of one per step (the same cyclic order
    of the steps; f and D see G's outputs from before its latest update). With `share_passes` as well, the
    G-step's own passes through f and D also serve the first of those f-steps (at the G-step's bridge point,
    not a fresh one) and, in the last G-step, the first D-step (D(xN) is one pass for both): G, f and D take
    those steps together (Trainer.run_phases), each from its own loss, with the weights and inputs the separate
    steps would see.
    `G_loss`: 'stated' (EOTLoss, docs/architecture.md) or 'kinetic' (KineticEOTLoss; f must be a velocity
    drift, see networks.eot_network_kwargs(drift='velocity')), or 'light' for vectors (LightEOTLoss): a fourth
    network V (models.light_sb.LightPotential, `V_kwargs`) learns the Schrodinger potential from the two
    marginals, and each iteration is one V-step, then `G_iters` x (`f_iters` f-steps, one G-step) with f
    regressing the bridge of V's plan and G fitted to V's samples by the energy score; the critic D is not
    used (no D-steps).
    """

    def __init__(self, data1_kwargs, data2_kwargs, test1_kwargs=None, loader_kwargs=None,
                 G_kwargs=None, f_kwargs=None, D_kwargs=None,
                 G_opt_kwargs=None, f_opt_kwargs=None, D_opt_kwargs=None, V_kwargs=None, V_opt_kwargs=None,
                 gamma=1.0, G_loss='stated', G_iters=10, f_iters=2, D_iters=1, D_gp=0.0, D_gp_every=1, sde_steps=10,
                 reuse_G_output=False, share_passes=False, grid_size=None, metrics=(), data2stats=None, detector=None,
                 samples_dir_G=None, samples_dir_SDE=None):
        self.kwargs = dnnlib.EasyDict(data1_kwargs=data1_kwargs, data2_kwargs=data2_kwargs, test1_kwargs=test1_kwargs,
                                      loader_kwargs=dict(loader_kwargs or {}))
        self.net_kwargs = dict(G=G_kwargs, f=f_kwargs, D=D_kwargs)
        self.opt_kwargs = dict(G=G_opt_kwargs, f=f_opt_kwargs, D=D_opt_kwargs)
        if G_loss not in G_LOSSES:
            raise ValueError(f'G_loss must be one of {sorted(G_LOSSES)}; got {G_loss!r}')
        f_class = (f_kwargs or {}).get('class_name', '')
        if G_loss in ('kinetic', 'light') and not f_class.endswith('VelocityDrift'):
            # Measured (docs/eot_benchmarks.md): with an end-point f the weighted G-step diverges (loss_G -> -1e16).
            raise ValueError(f'G_loss="{G_loss}" needs f = x + (1 - t) v (models.networks.VelocityDrift or '
                             f'UNetVelocityDrift); got f class {f_class!r}. Build the networks with '
                             'eot_network_kwargs(..., drift="velocity")')
        if (G_loss == 'light') != (V_kwargs is not None):
            raise ValueError('G_loss="light" and V_kwargs (its potential network) go together; got '
                             f'G_loss={G_loss!r} with V_kwargs={V_kwargs!r}')
        if V_kwargs is not None:
            self.net_kwargs['V'], self.opt_kwargs['V'] = V_kwargs, V_opt_kwargs
        check_step_options(G_loss, reuse_G_output, share_passes)
        self.G_loss = G_loss
        self.loss = G_LOSSES[G_loss](gamma)
        self.G_iters, self.f_iters, self.D_iters = int(G_iters), int(f_iters), int(D_iters)
        if not D_gp >= 0:
            raise ValueError(f'D_gp (the critic\'s gradient-penalty weight) must be >= 0; got {D_gp}')
        self.D_gp = float(D_gp)
        if not (int(D_gp_every) == D_gp_every and D_gp_every >= 1):
            raise ValueError(f'D_gp_every (critic steps per gradient penalty) must be an int >= 1; got {D_gp_every}')
        self.D_gp_every = int(D_gp_every)
        self.reuse_G_output = bool(reuse_G_output)
        self.share_passes = bool(share_passes)
        self._G_outputs = [] # With reuse_G_output: (x0, xN detached) of each round of the latest G-step.
        self.sde_steps = int(sde_steps)
        self.grid_size = grid_size
        self.metrics = tuple(metrics)
        self.data2stats = data2stats
        self.detector = detector
        self.samples_dir = dict(G=samples_dir_G, SDE=samples_dir_SDE)
        self.provenance = {}

    def networks(self):
        """{name: network kwargs} of the networks this task trains (resume checks build them)."""
        return dict(self.net_kwargs)

    # Set-up --------------------------------------------------------------

    def setup(self, trainer, run_dir, seed):
        self.run_dir = run_dir
        self.seed = seed
        self.best = {}
        dist.print0('Loading datasets...')
        ds1 = dnnlib.util.construct_class_by_name(**self.kwargs.data1_kwargs)
        ds2 = dnnlib.util.construct_class_by_name(**self.kwargs.data2_kwargs)
        self.data_shape = tuple(ds1.item_shape)
        if tuple(ds2.item_shape) != self.data_shape:
            raise ValueError(f'The domains differ in shape: {list(self.data_shape)} vs {list(ds2.item_shape)}')
        self.test1 = dnnlib.util.construct_class_by_name(**self.kwargs.test1_kwargs) if self.kwargs.test1_kwargs else ds1
        loader = self.kwargs.loader_kwargs
        self.data1 = DataStream(ds1, trainer.batch_gpu, trainer.device, seed=seed, loader_kwargs=loader)
        self.data2 = DataStream(ds2, trainer.batch_gpu, trainer.device, seed=seed + 1, loader_kwargs=loader)
        dist.print0(f'Domain 1: {len(ds1)} items, domain 2: {len(ds2)} items, shape {list(self.data_shape)}')
        if dist.get_rank() == 0: # Provenance: what the snapshots were trained on.
            self.provenance.update(data1_sha256=ds1.data_hash(progress=True), data2_sha256=ds2.data_hash(progress=True))

        dist.print0('Constructing networks...')
        for name in self.net_kwargs:
            net = dnnlib.util.construct_class_by_name(**self.net_kwargs[name])
            if name == 'V': # The potential's means: k-means++ seeds among the first target items (alike on all ranks).
                y = np.stack([ds2[i][0] for i in range(min(len(ds2), V_INIT_ITEMS))])
                net.init_from(to_model_space(torch.as_tensor(y), 'cpu'), generator=torch.Generator().manual_seed(seed))
            trainer.add_network(name, net, self.opt_kwargs[name])
        # Fixed inputs and noise for figures and tick statistics (more points for vector scatter plots).
        n = self.grid_size if self.grid_size is not None else (16 if len(self.data_shape) == 3 else 1024)
        n = min(n, len(self.test1))
        self.fixed_x0 = to_model_space(torch.as_tensor(np.stack([self.test1[i][0] for i in range(n)])), trainer.device)
        self.fixed_x1 = to_model_space(torch.as_tensor(np.stack([ds2[i][0] for i in range(min(n, len(ds2)))])), 'cpu')
        gen = torch.Generator().manual_seed(seed)
        G = trainer.nets['G']
        self.fixed_z = torch.randn([n, *G.z_shape], generator=gen).to(trainer.device)
        if dist.get_rank() == 0:
            x, t = self.fixed_x0[:2], torch.full([2], 0.5, device=trainer.device)
            for name, args in (('G', [x, self.fixed_z[:2]]), ('f', [x, t]), ('D', [x])):
                net = trainer.nets[name]
                print(f'{name}: {type(net).__name__}, {sum(p.numel() for p in net.parameters()):,} parameters')
                misc.print_module_summary(net, args, max_nesting=2)
        self._setup_metrics(trainer)

    def _setup_metrics(self, trainer):
        """Load the FID detector and reference statistics; without them, say so once and train on."""
        self.detector_net, self.ref_stats = None, None
        if not self.metrics:
            return
        try:
            self.detector_net = detector_lib.load_detector(self.detector, device=trainer.device)
            self.ref_stats = fid_lib.load_ref_stats(self.data2stats)
        except (detector_lib.DetectorUnavailable, OSError) as err:
            self.detector_net = None
            dist.print0(f'Metrics {",".join(self.metrics)} disabled (training goes on): {str(err).splitlines()[0]}')

    # One outer iteration --------------------------------------------------

    def iteration(self, trainer):
        G = trainer.nets['G']
        if self.G_loss == 'light':
            self._light_iteration(trainer, G)
            return
        shared_D = False
        for g in range(self.G_iters):
            if not self.reuse_G_output:
                for _ in range(self.f_iters):
                    trainer.run_phase('f', lambda f_ddp: self._f_step(trainer, f_ddp, self._batch(trainer, G)))
            # With share_passes the G-step's passes through f and D also serve the first f-step and (in the last
            # G-step) the first D-step: those networks then train in the same phase.
            shared = ['f'] * (self.share_passes and self.f_iters > 0)
            shared_D = self.share_passes and self.D_iters > 0 and g == self.G_iters - 1
            shared += ['D'] * shared_D
            gp = self._gp_weight(trainer, 0) if shared_D else 0.0
            self._G_outputs = []
            # Networks only evaluated in the G-step: their raw modules (no DDP hooks) with frozen weights.
            with frozen([p for name in ('f', 'D') if name not in shared for p in trainer.params[name]]):
                trainer.run_phases(['G', *shared], lambda calls: self._G_step(trainer, calls, gp))
            if self.reuse_G_output:
                for _ in range(self.f_iters - int('f' in shared)):
                    outputs = iter(self._G_outputs) # Round r of a step takes round r of the G-step.
                    trainer.run_phase('f', lambda f_ddp: self._f_step(trainer, f_ddp, next(outputs)))
        for d in range(int(shared_D), self.D_iters):
            gp = self._gp_weight(trainer, d)
            outputs = iter(self._G_outputs)
            batch = (lambda: next(outputs)) if self.reuse_G_output else (lambda: self._batch(trainer, G))
            trainer.run_phase('D', lambda D_ddp: self._D_step(trainer, D_ddp, gp, batch()))
        self._G_outputs = []

    def _gp_weight(self, trainer, d):
        """The penalty weight of the iteration's critic step d. Lazy penalty: on every D_gp_every-th critic step,
        weighted by D_gp_every; counted from cur_nimg, so a resumed run penalises the same steps."""
        step = trainer.cur_nimg // trainer.batch_size * self.D_iters + d
        return self.D_gp * self.D_gp_every if step % self.D_gp_every == 0 else 0.0

    def _batch(self, trainer, G):
        """(x0, xN): a fresh batch of domain 1 and its fixed target under no_grad (no graph): G's outputs or, with
        the light G-step, a draw of V's plan."""
        x0 = self.data1.next()
        with torch.no_grad():
            if self.G_loss == 'light':
                return x0, self._teacher_sample(trainer, x0)
            return x0, self._generate(trainer, G, x0)

    def _light_iteration(self, trainer, G):
        """One V-step on fresh batches of both domains, then G_iters x (f_iters f-steps, one G-step), f and G
        both learning from V's plan (V is evaluated under no_grad there)."""
        trainer.run_phase('V', lambda V_ddp: V_ddp(self.data1.next(), self.data2.next()))
        for _ in range(self.G_iters):
            for _ in range(self.f_iters):
                trainer.run_phase('f', lambda f_ddp: self._f_step(trainer, f_ddp, self._batch(trainer, G)))
            trainer.run_phase('G', lambda G_ddp: self._distill_step(trainer, G_ddp))

    def _teacher_sample(self, trainer, x0):
        """One draw of V's plan pi_V(. | x0) per row (the raw potential, no graph), from the loop's random stream."""
        return trainer.nets['V'].sample(x0, trainer.rand([x0.shape[0]]), trainer.randn(x0.shape))

    def _distill_step(self, trainer, G_ddp):
        x0 = self.data1.next()
        target = self._teacher_sample(trainer, x0)
        m = self.loss.SAMPLES
        xN = self._generate(trainer, G_ddp, x0.repeat(m, *([1] * (x0.ndim - 1))))
        return self.loss.energy_score(xN.reshape(m, *x0.shape), target)

    def _bridge_noise(self, trainer, x0):
        return self.loss.sample_t(trainer.rand([x0.shape[0]])), trainer.randn(x0.shape)

    def _generate(self, trainer, G, x0):
        z = trainer.randn([x0.shape[0], *trainer.nets['G'].z_shape]) # (G may be the DDP wrapper.)
        with trainer.autocast():
            return G(x0, z).float()

    def _f_step(self, trainer, f_ddp, batch):
        """`batch`: (x0, xN) with xN a fixed target, carrying no graph to G."""
        x0, xN = batch
        t, n = self._bridge_noise(trainer, x0)
        with trainer.autocast():
            return self.loss.f_loss(f_ddp, x0, xN, t, n)

    def _G_step(self, trainer, calls, gp_weight):
        """G's loss on a fresh batch (`calls`: run_phases' networks, G's first) and, for 'f' / 'D' among `calls`,
        the f-step's / D-step's loss (with a fresh target batch and penalty weight `gp_weight`) on its inputs
        and outputs, from the same passes (EOTLoss.step_losses)."""
        x0 = self.data1.next()
        xN = self._generate(trainer, calls['G'], x0)
        if self.reuse_G_output:
            self._G_outputs.append((x0, xN.detach()))
        t, n = self._bridge_noise(trainer, x0)
        x1 = self.data2.next() if 'D' in calls else None
        alpha = trainer.rand([x0.shape[0]]) if x1 is not None and gp_weight else None
        f, D = (calls.get(name, trainer.nets[name]) for name in ('f', 'D'))
        with trainer.autocast():
            losses, transport = self.loss.step_losses(f, D, x0, xN, t, n, f_step='f' in calls, x1=x1,
                                                      gp_weight=gp_weight, alpha=alpha, D_penalty=trainer.nets['D'])
        training_stats.report('Loss/G_transport', transport)
        return losses

    def _D_step(self, trainer, D_ddp, gp_weight, batch):
        """`batch`: (x0, xN) as in _f_step; a fresh batch x1 of domain 2."""
        (x0, xN), x1 = batch, self.data2.next()
        alpha = trainer.rand([x0.shape[0]]) if gp_weight else None
        with trainer.autocast():
            return self.loss.D_loss(D_ddp, xN, x1, gp_weight=gp_weight, alpha=alpha, D_penalty=trainer.nets['D'])

    # Ticks and snapshots ---------------------------------------------------

    def translate(self, trainer, x0, sampler, seeds):
        """Translate x0 with the EMA networks exactly as generate.py translates with a snapshot of them:
        sampler 'G' (one step) or 'SDE', sample i's noise from seeds[i] (sampling.translation.translate)."""
        rnd = StackedRandomGenerator(x0.device, seeds)
        return translation.translate(self._ema_model(trainer), x0, rnd, dict(G='G', SDE='sde')[sampler])

    def _ema_model(self, trainer):
        """The EMA networks as the model generate.py loads from a snapshot (sampling.snapshots.as_model)."""
        data = dict(kind='eot', G=trainer.ema['G'], f=trainer.ema['f'], D=trainer.ema['D'], gamma=self.loss.gamma,
                    sde_steps=self.sde_steps, data_shape=list(self.data_shape), kimg=trainer.cur_nimg / 1000)
        return snapshots.as_model(data, source='training')

    @torch.no_grad()
    def report_tick_stats(self, trainer):
        """Output variance over 2 noise draws and the RMS distance to the input, for G and the SDE (draw r of
        input i with the seed 2 i + r, as generate.py --repeats=2)."""
        if dist.get_rank() != 0:
            return
        x0 = self.fixed_x0
        seeds = repeat_seeds(range(x0.shape[0]), 2)
        for sampler in ('G', 'SDE'):
            outs = torch.stack([self.translate(trainer, x0, sampler, seeds[:, r]) for r in range(2)])
            training_stats.report(f'Output/{sampler}_var', outs.var(dim=0).mean()) # Unbiased over the draws.
            training_stats.report(f'Output/{sampler}_L2', (outs[0] - x0).square().flatten(1).mean(1).sqrt())

    def snapshot_data(self, trainer):
        # gamma and G_loss define the loss; the loss object itself is not stored (it held gamma a second time).
        return dict(kind='eot', G=cpu_copy(trainer.ema['G']), f=cpu_copy(trainer.ema['f']),
                    D=cpu_copy(trainer.ema['D']), G_loss=self.G_loss, gamma=self.loss.gamma,
                    sde_steps=self.sde_steps,
                    data_shape=list(self.data_shape), dataset_kwargs=dict(self.kwargs),
                    provenance=dict(self.provenance), kimg=trainer.cur_nimg / 1000)

    @torch.no_grad()
    def on_snapshot(self, trainer, run_dir, tag):
        """fakes-<tag>.png (tag: the image count in the snapshot's name): the first test inputs and their G and
        SDE translations with seeds 0, 1, ... (the images generate.py writes for them with this snapshot); then
        _evaluate."""
        if dist.get_rank() == 0:
            x0 = self.fixed_x0
            seeds = range(x0.shape[0])
            sets = dict(source=x0, target=self.fixed_x1, G=self.translate(trainer, x0, 'G', seeds),
                        SDE=self.translate(trainer, x0, 'SDE', seeds))
            images.save_translation_figure(sets, os.path.join(run_dir, f'fakes-{tag}.png'))
        self._evaluate(trainer, run_dir, tag)

    def _test_batches(self, trainer, sampler):
        """This rank's share of the domain-1 test set translated by `sampler` through generate.py's iterator
        (sampling.translation.iterate_translations: input i with seed i, batches of batch_gpu dealt across
        ranks): (indices, outputs in model space). `generate.py --seeds=0-<N-1> --batch=<batch_gpu>` with the
        snapshot writes the same images, bit for bit on the same device."""
        name = dict(G='G', SDE='sde')[sampler]
        for batch in translation.iterate_translations(self._ema_model(trainer), self.test1, sampler=name,
                                                      batch_size=trainer.batch_gpu, device=trainer.device):
            yield batch.index, batch.y

    @torch.no_grad()
    def _evaluate(self, trainer, run_dir, tag):
        """FID of G and SDE translations of the test set, and/or the translations as PNGs."""
        for sampler in ('G', 'SDE'):
            metric = f'fid_{sampler}'
            want_fid = metric in self.metrics and self.detector_net is not None
            out_dir = self.samples_dir[sampler]
            if not want_fid and out_dir is None:
                continue
            if out_dir is not None:
                out_dir = out_dir if os.path.isabs(out_dir) else os.path.join(self.run_dir or '.', out_dir)
                os.makedirs(out_dir, exist_ok=True)

            def uint8_batches():
                for chunk, out in self._test_batches(trainer, sampler):
                    u8 = to_uint8(out)
                    if out_dir is not None and len(self.data_shape) == 3:
                        for i, img in zip(chunk, u8.cpu().numpy()):
                            images.save_png(img.transpose(1, 2, 0).squeeze(2) if img.shape[0] == 1 else
                                               img.transpose(1, 2, 0), os.path.join(out_dir, f'{int(i):06d}.png'))
                    yield u8

            if not want_fid:
                for _ in uint8_batches():
                    pass
                continue
            mu, sigma = fid_lib.compute_feature_stats(uint8_batches(), self.detector_net, batch_size=trainer.batch_gpu)
            value = float(fid_lib.calculate_fid_from_inception_stats(mu, sigma, *self.ref_stats))
            self.best[metric] = min(self.best.get(metric, float('inf')), value)
            if dist.get_rank() == 0:
                record = dict(results={metric: value}, best={metric: self.best[metric]}, kimg=trainer.cur_nimg / 1000,
                              snapshot_pkl=f'network-snapshot-{tag}.pkl', detector=self.detector_net.name,
                              timestamp=time.time())
                with open(os.path.join(run_dir, f'metric-{metric}.jsonl'), 'a', encoding='utf-8') as f:
                    f.write(json.dumps(record) + '\n')
                note = ' (new best)' if value == self.best[metric] else f' (best {self.best[metric]:g})'
                dist.print0(f'{metric} {value:g}{note}')

    def state_dict(self):
        return dict(data1=self.data1.state_dict(), data2=self.data2.state_dict(), best=dict(self.best))

    def load_state_dict(self, state):
        self.data1.load_state_dict(state['data1'])
        self.data2.load_state_dict(state['data2'])
        self.best = dict(state.get('best', {}))
