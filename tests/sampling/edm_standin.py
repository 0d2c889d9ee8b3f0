"""A stand-in for NVlabs/edm's pickled denoisers, written here from the EDM paper and edm's documented interface
(edm's code is CC BY-NC-SA and is not copied): what `generate.py` and `potential.py` see of a
`network-snapshot-*.pkl` that edm's training loop writes.

Interface and defaults as edm's `EDMPrecond`: attributes img_resolution, img_channels, label_dim, use_fp16,
sigma_min = 0, sigma_max = inf (edm's train.py never overrides them; its sampler clamps them to 0.002 .. 80),
sigma_data = 0.5; `round_sigma(sigma)` (the identity, as a tensor); `forward(x, sigma, class_labels=None,
force_fp32=False)` computes in float32 with sigma of shape [N] or a scalar (a 0-dim float64 tensor, as edm's
sampler passes it), class_labels one-hot [N, label_dim] (an all-zero label when None), and the EDM
preconditioning of Karras et al. 2022, Table 1. Its raw network F is a fixed random convolution whose output
depends on the noise level and, through a label embedding, on the class.
"""

import pickle

import torch

from sampling import diffusion
from sampling import potential as potential_lib
from torch_utils.misc import state_dict_sha256


class EDMStandIn(torch.nn.Module):
    """D(x; sigma, y) = c_skip x + c_out F(c_in x, c_noise, y), F = tanh(conv(.) + label and noise terms)."""

    def __init__(self, img_resolution=8, img_channels=3, label_dim=0, sigma_min=0, sigma_max=float('inf'),
                 sigma_data=0.5, seed=0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = False, sigma_min, sigma_max, sigma_data
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(img_channels, img_channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.5)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=gen) * 0.1)
        self.noise_weight = torch.nn.Parameter(torch.randn([img_channels], generator=gen))
        self.label_embedding = torch.nn.Parameter(torch.randn([max(label_dim, 1), img_channels], generator=gen))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            labels = None
        elif class_labels is None:
            labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        s2, d2 = sigma ** 2, self.sigma_data ** 2
        c_skip, c_out, c_in = d2 / (s2 + d2), sigma * self.sigma_data / (s2 + d2).sqrt(), 1 / (s2 + d2).sqrt()
        c_noise = sigma.log() / 4
        h = self.conv(c_in * x) + c_noise * self.noise_weight.reshape(1, -1, 1, 1)
        if labels is not None:
            h = h + (labels @ self.label_embedding)[:, :, None, None]
        return (c_skip * x + c_out * torch.tanh(h)).to(torch.float32)


def edm_snapshot(path, **kwargs):
    """Pickle an EDMStandIn as edm's training loop writes a snapshot: dict(ema, loss_fn, augment_pipe,
    dataset_kwargs). Returns the path as a str."""
    net = EDMStandIn(**kwargs).eval().requires_grad_(False)
    data = dict(ema=net, loss_fn=None, augment_pipe=None,
                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='cifar10-32x32.zip'))
    with open(path, 'wb') as f:
        pickle.dump(data, f)
    return str(path)


def potential_for(path, net, num_targets=8, back_steps=2, num_steps=6, seed=0, **fields):
    """A potential file for `net` (random targets, the network's hash), with extra top-level fields
    such as labels (int64 [N]) or class_label, as potential.py records them for class-conditional networks."""
    gen = torch.Generator().manual_seed(seed)
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    # Targets of equal norm and h_i = -<c, y_i> (c the cube's centre): scores <u - c, y_i>, so that every cell of
    # the uniform source gets a share of the seeds (random heights leave most cells empty).
    targets = torch.randn([num_targets, *shape], generator=gen)
    targets = targets / targets.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) * len(targets[0].flatten()) ** 0.5
    h = -0.5 * targets.flatten(1).sum(dim=1).to(torch.float64)
    path = potential_lib.save_potential(path, h=h, sigmas=diffusion.net_sigma_schedule(net, num_steps),
                                        back_steps=back_steps, source='uniform', data_shape=shape, score_gap=1.0,
                                        targets=targets, provenance=dict(denoiser_sha256=state_dict_sha256(net)))
    pot = torch.load(path, weights_only=True)
    pot.update(fields)
    torch.save(pot, path)
    return str(path)
