"""The diffusion denoiser as a task of the shared training loop (training/loop.py)."""

import os

import torch

import dnnlib
from sampling.diffusion import _denoise, net_sigma_schedule, sample_heun, sampling_dtype
from torch_utils import distributed as dist
from torch_utils import images
from torch_utils import training_stats
from torch_utils.images import to_model_space
from training.trainer import DataStream, cpu_copy


def _per_sample_mean(x):
    return x.flatten(1).mean(dim=1)

#----------------------------------------------------------------------------

class DenoiserTask:
    """A preconditioned denoiser trained with a diffusion loss in the shared loop (training/loop.py).

    One iteration: one optimisation step of the network 'denoiser' on a fresh batch. Snapshots hold the EMA
    network under `ema` (as EDM's), the loss under `loss_fn`, and the data set's kwargs, shape and sha256.

    Args:
        data_kwargs: the data set (class_name + options).
        loader_kwargs: DataLoader options.
        network_kwargs: the Denoiser (class_name + options), e.g. models.networks.denoiser_kwargs(...).
        loss_kwargs: the loss (class_name + options), e.g. dict(class_name='models.diffusion_loss.EDMLoss').
        optimizer_kwargs: the optimiser (class_name + options).
        sample_steps: Heun steps of the figures made at each snapshot.
        num_figure_samples: samples in those figures (default 16 images or 1024 vectors).
    """

    def __init__(self, data_kwargs, network_kwargs, loss_kwargs, optimizer_kwargs, loader_kwargs=None,
                 sample_steps=18, num_figure_samples=None, provenance=None):
        self.data_kwargs = dict(data_kwargs)
        self.loader_kwargs = dict(loader_kwargs or {})
        self.network_kwargs = dict(network_kwargs)
        self.loss_kwargs = dict(loss_kwargs)
        self.optimizer_kwargs = dict(optimizer_kwargs)
        self.sample_steps = int(sample_steps)
        self.num_figure_samples = num_figure_samples
        self.provenance = dict(provenance or {})

    def networks(self):
        """{name: network kwargs} of the networks this task trains (resume checks build them)."""
        return dict(denoiser=self.network_kwargs)

    def setup(self, trainer, run_dir, seed):
        self.run_dir = run_dir
        dist.print0('Loading dataset...')
        dataset = dnnlib.util.construct_class_by_name(**self.data_kwargs)
        self.data_shape = tuple(dataset.item_shape)
        self.dataset_size = len(dataset)
        self.provenance.setdefault('data_sha256', dataset.data_hash(progress=True))
        self.data = DataStream(dataset, trainer.batch_gpu, trainer.device, seed=seed, loader_kwargs=self.loader_kwargs)
        dist.print0(f'Dataset: {len(dataset)} items of shape {list(self.data_shape)}')
        self.loss = dnnlib.util.construct_class_by_name(**self.loss_kwargs)
        dist.print0('Constructing network...')
        net = dnnlib.util.construct_class_by_name(**self.network_kwargs)
        if tuple(net.data_shape) != self.data_shape:
            raise ValueError(f'The network is built for data of shape {list(net.data_shape)} but the data set holds '
                             f'{list(self.data_shape)}; build it with data_shape={list(self.data_shape)}')
        trainer.add_network('denoiser', net, self.optimizer_kwargs)
        dist.print0(f'Denoiser: {type(net).__name__} ({getattr(net, "precond", "-")}), '
                    f'{sum(p.numel() for p in net.parameters()):,} parameters')
        n = self.num_figure_samples or (16 if len(self.data_shape) == 3 else 1024)
        gen = torch.Generator().manual_seed(seed)
        self.fixed_noise = torch.randn([n, *self.data_shape], generator=gen)
        self.fixed_data = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(min(n, len(dataset)))])

    def iteration(self, trainer):
        trainer.run_phase('denoiser', lambda ddp: self._step(trainer, ddp))

    def _step(self, trainer, ddp):
        y = self.data.next()
        with trainer.autocast():
            return self.loss(ddp, y, trainer)

    @torch.no_grad()
    def report_tick_stats(self, trainer):
        """Denoising error |D(y + sigma n; sigma) - y|^2 of the EMA network at a few fixed noise levels."""
        if dist.get_rank() != 0:
            return
        net = trainer.ema['denoiser']
        y = to_model_space(self.fixed_data, trainer.device)
        gen = torch.Generator().manual_seed(1)
        for sigma in (0.02, 0.2, 2.0):
            n = torch.randn(y.shape, generator=gen).to(trainer.device)
            err = _per_sample_mean((_denoise(net, y + sigma * n, sigma) - y).square())
            training_stats.report(f'Denoise/mse_sigma{sigma:g}', err)

    def sample(self, net, noise, num_steps=None):
        """Heun samples from `noise` (N(0, I), scaled here to the network's sigma_max)."""
        sigmas = net_sigma_schedule(net, num_steps or self.sample_steps)
        x = noise.to(sampling_dtype(noise.device)) * sigmas[0]
        return sample_heun(net, x, sigmas).to(torch.float32)

    def snapshot_data(self, trainer):
        return dict(kind='denoiser', ema=cpu_copy(trainer.ema['denoiser']), loss_fn=self.loss,
                    augment_pipe=None, data_shape=list(self.data_shape), dataset_kwargs=dict(self.data_kwargs),
                    provenance=dict(self.provenance), kimg=trainer.cur_nimg / 1000)

    def on_snapshot(self, trainer, run_dir, tag):
        if dist.get_rank() != 0:
            return
        net = trainer.ema['denoiser']
        samples = self.sample(net, self.fixed_noise.to(trainer.device)).cpu()
        data = to_model_space(self.fixed_data, 'cpu')
        path = os.path.join(run_dir, f'fakes-{tag}.png')
        if len(self.data_shape) == 3:
            images.save_png(images.image_grid([data, samples]), path)
        else:
            images.save_png(images.scatter_plot(dict(data=data, samples=samples)), path)

    def state_dict(self):
        return dict(data=self.data.state_dict())

    def load_state_dict(self, state):
        self.data.load_state_dict(state['data'])
