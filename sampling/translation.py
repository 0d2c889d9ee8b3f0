"""Translation with an EOT snapshot: the one-step G and the f-SDE, batch by batch with per-sample seeds.

Seeding: input i of a translation (in dataset order) uses `seeds[i]`; with R repeats per input, repeat r
of input i uses the seed `seeds[i] * R + r` (so R = 1 gives `seeds[i]`). Every random tensor of a sample
(G's z, then the SDE's step noises in order) comes from that seed's generator.
"""

import collections
import math

import numpy as np
import torch
import tqdm

from data.dataset import DatasetError, open_dataset
from sampling import GenerationError
from sampling.rng import MAX_SEEDS, StackedRandomGenerator, rank_batches, repeat_seeds
from sampling.snapshots import EOT_SAMPLERS
from torch_utils import distributed as dist
from torch_utils.images import to_model_space

#----------------------------------------------------------------------------
# The f-SDE.

@torch.no_grad()
def sample_sde(f, x0, gamma, num_steps=10, randn_like=torch.randn_like, return_trajectory=False):
    """Euler-Maruyama for dx = (f(x, t) - x) / (1 - t) dt + sqrt(gamma) dW from t = 0 to 1.

    No noise is added on the last step, which lands on f's end-point prediction. `randn_like` draws
    the noise (pass a per-sample seeded one for reproducibility). Returns x1, or (x1, [x_0, ..., x_1]).
    """
    if num_steps < 1:
        raise ValueError(f'the SDE needs at least one step; got num_steps={num_steps}')
    x = x0
    dt = 1.0 / num_steps
    trajectory = [x0]
    for k in range(num_steps):
        t = k * dt
        tt = torch.full([x.shape[0]], t, device=x.device, dtype=torch.float32)
        x = x + dt * (f(x, tt).to(x.dtype) - x) / (1 - t)
        if k < num_steps - 1 and gamma > 0:
            x = x + math.sqrt(gamma * dt) * randn_like(x)
        if return_trajectory:
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x

#----------------------------------------------------------------------------
# Data.

def open_inputs(path, model):
    """Open --data and check that its items have the shape the model was trained on."""
    try:
        dataset = open_dataset(path)
    except (DatasetError, OSError) as err:
        raise GenerationError(f'--data: {err}') from None
    shape = tuple(dataset.item_shape)
    if shape != tuple(model.data_shape):
        what = 'vectors of dimension' if len(model.data_shape) == 1 else 'images of shape [C, H, W] ='
        fix = ('rebuild it with dataset_tool.py --resolution / --colorize' if len(shape) == 3 else
               'use data of the dimension the model was trained on')
        raise GenerationError(f'--data="{path}" holds items of shape {list(shape)}, but the network was trained on '
                              f'{what} {list(model.data_shape)}; {fix}')
    return dataset

def load_items(dataset, indices, device):
    """Items `indices` of a dataset in model space (images in [-1, 1]) as float32 on `device`."""
    batch = torch.as_tensor(np.stack([dataset[int(i)][0] for i in indices]))
    return to_model_space(batch, device)

#----------------------------------------------------------------------------
# Translation.

@torch.no_grad()
def translate(model, x0, rnd, sampler='G', steps=None, gamma=None):
    """Translate x0 with an EOT model: 'G' (one step, z from `rnd`) or 'sde' (steps and gamma default to
    the snapshot's); all noise is drawn from the StackedRandomGenerator `rnd`, one row per sample."""
    if sampler == 'G':
        z = rnd.randn([x0.shape[0], *model.G.z_shape], dtype=x0.dtype)
        return model.G(x0, z)
    if sampler == 'sde':
        steps = model.sde_steps if steps is None else int(steps)
        gamma = model.gamma if gamma is None else float(gamma)
        return sample_sde(model.f, x0, gamma, steps, randn_like=rnd.randn_like)
    raise GenerationError(f'sampler {sampler!r} does not apply to EOT snapshots; use one of {", ".join(EOT_SAMPLERS)}')

TranslationBatch = collections.namedtuple('TranslationBatch', ['index', 'repeat', 'seed', 'x', 'y'])

TranslationBatch.__doc__ = """One batch of translations: input indices [B], repeat numbers [B], seeds [B]
(int64 numpy), inputs x and outputs y (float32 tensors in model space, [B, *data_shape])."""

def iterate_translations(model, dataset, seeds=None, num=None, sampler='G', steps=None, gamma=None, repeats=1,
                         batch_size=64, device=torch.device('cpu'), rank=None, world_size=None, progress=False):
    """Translate the first `num` inputs of `dataset` (default all), `repeats` times each; this rank's share.

    Jobs are (input i, repeat r) in order i * repeats + r, with seed seeds[i] * repeats + r
    (seeds default to 0, 1, 2, ...). Batches of `batch_size` jobs are dealt round-robin across ranks, so
    outputs do not depend on the batch size or the number of ranks. Yields TranslationBatch.
    """
    if model.kind != 'eot':
        raise GenerationError(f'the network is of kind {model.kind}; translation needs an EOT snapshot (G, f, D)')
    if sampler not in EOT_SAMPLERS:
        raise GenerationError(f'sampler {sampler!r} does not apply to EOT snapshots; use one of {", ".join(EOT_SAMPLERS)}')
    num = len(dataset) if num is None else int(num)
    if not 1 <= num <= len(dataset):
        raise GenerationError(f'cannot translate {num} inputs: the data holds {len(dataset)}')
    if num * int(repeats) > MAX_SEEDS:
        raise GenerationError(f'{num} inputs x {repeats} repeats = {num * int(repeats):,} outputs; at most {MAX_SEEDS:,} '
                              'per call')
    seeds = list(range(num)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != num:
        raise GenerationError(f'{len(seeds)} seeds for {num} inputs: give one seed per input')
    job_seeds = repeat_seeds(seeds, repeats).reshape(-1)
    batches = rank_batches(num * repeats, batch_size, rank, world_size)
    for jobs in tqdm.tqdm(batches, desc=f'Translating ({sampler})', unit='batch',
                          disable=not progress or dist.get_rank() != 0):
        index, repeat = jobs // repeats, jobs % repeats
        x = load_items(dataset, index, device)
        rnd = StackedRandomGenerator(device, job_seeds[jobs])
        y = translate(model, x, rnd, sampler, steps, gamma)
        yield TranslationBatch(index, repeat, job_seeds[jobs], x, y)
