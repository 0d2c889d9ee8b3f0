"""The losses of one-step entropic OT, per sample: the G-step as stated (`EOTLoss`), its 1 / (1 - t)^2-weighted
"kinetic" variant (`KineticEOTLoss`) and the energy score against a learned potential's plan (`LightEOTLoss`;
docs/eot_benchmarks.md).

A generator G maps a source sample x0 and fresh noise to xN in one call; a drift network f defines the
Schrodinger-bridge SDE; a Wasserstein critic D pulls G's outputs onto the target set. `gamma` is the
entropy: the bridge has volatility sqrt(gamma), i.e. EOT with cost |x - y|^2 / 2 and eps = gamma
(docs/architecture.md, "One-step EOT").

The losses are persistent classes pickled into snapshots with this file's source, so this module imports
only torch and torch_utils.
"""

import torch

from torch_utils import persistence
from torch_utils import training_stats

#----------------------------------------------------------------------------

def _per_sample_mean(x):
    return x.flatten(1).mean(dim=1)

@persistence.persistent_class
class EOTLoss:
    """The three losses of one-step EOT, per sample (their batch means are the losses of docs/architecture.md)."""

    def __init__(self, gamma=1.0):
        if not gamma >= 0:
            raise ValueError(f'gamma must be >= 0 (it is the entropy eps of EOT); got {gamma}')
        self.gamma = float(gamma)

    def sample_t(self, u):
        """Bridge times t [N] from uniform draws u [N]: t ~ U(0, 1), as stated."""
        return u

    def transport_weight(self, t):
        """Per-sample weight [N] of the G-step transport term at times t drawn by sample_t: 1, as stated."""
        return torch.ones_like(t)

    def bridge(self, x0, xN, t, n):
        """Brownian-bridge point x_t = x0 + t (xN - x0) + sqrt(gamma t (1 - t)) n, with t [N] in [0, 1]."""
        t = t.reshape(-1, *([1] * (x0.ndim - 1)))
        return x0 + t * (xN - x0) + (self.gamma * t * (1 - t)).sqrt() * n

    def f_loss(self, f, x0, xN, t, n):
        """|f(x_t, t) - xN|^2: f regresses the bridge's end point (xN must carry no graph to G)."""
        xt = self.bridge(x0, xN, t, n)
        return self._f_regression(f(xt, t).float(), xN)

    def _f_regression(self, f_out, xN):
        return _per_sample_mean((f_out - xN.detach()).square())

    def G_loss(self, f, D, x0, xN, t, n):
        """w(t) 2 ( <f(x_t,t) - x_t, xN - x_t> - |f(x_t,t) - x_t|^2 / 2 ) - D(xN), w = transport_weight (1 here).

        Returns (loss, weighted transport term), both per sample; gradients reach G through xN and x_t.
        """
        losses, transport = self.step_losses(f, D, x0, xN, t, n)
        return losses['G'], transport

    def step_losses(self, f, D, x0, xN, t, n, f_step=False, x1=None, gp_weight=0.0, alpha=None, D_penalty=None):
        """The G-step's loss (G_loss) and, from the same passes through f and D, the f-step's and the D-step's
        losses on the G-step's own inputs and outputs: one f pass and one D pass serve two steps.

        `f_step`: add 'f', f_loss at the same bridge point x_t (xN detached as the target); `x1`: a batch of
        the target domain, adds 'D', D_loss(D, xN, x1, gp_weight, alpha, D_penalty) with D(xN) the scores
        G's loss uses. Returns ({'G': ..., 'f': ..., 'D': ...} per sample, weighted transport term). Each loss
        must reach only its own network's parameters (Trainer.run_phases backpropagates it into those alone):
        G's loss depends on f's and D's weights too.
        """
        xt = self.bridge(x0, xN, t, n)
        f_out = f(xt, t).float()
        drift = f_out - xt
        transport = 2 * (_per_sample_mean(drift * (xN - xt)) - _per_sample_mean(drift.square()) / 2)
        transport = self.transport_weight(t).float() * transport
        losses = {}
        if f_step:
            losses['f'] = self._f_regression(f_out, xN)
        if x1 is None:
            scores = D(xN).float()
        else:
            scores = D(torch.cat([xN, x1])).float() # One pass through D (and its DDP wrapper) for both.
            losses['D'] = self._critic(D if D_penalty is None else D_penalty, scores, xN, x1, gp_weight, alpha)
        losses['G'] = transport - scores[:xN.shape[0]]
        return losses, transport

    def D_loss(self, D, xN, x1, gp_weight=0.0, alpha=None, D_penalty=None):
        """D(xN) - D(x1): a Wasserstein critic, low on targets and high on G's outputs.

        With `gp_weight` > 0 adds the WGAN-GP penalty (Gulrajani et al. 2017) gp_weight (|grad D(x_hat)| - 1)^2
        at x_hat = alpha xN + (1 - alpha) x1, alpha [N] in [0, 1] (an addition to the stated method; train.py --D-gp).
        The penalty runs its own pass through `D_penalty` (default D): its backward and double backward then
        cover only the N interpolates, not the 2N rows of the scores. A task that passes a DDP wrapper as D
        passes the wrapped module here (one wrapper forward per backward; the gradient hooks sit on the
        parameters, so the penalty's gradient is averaged across ranks all the same).
        """
        scores = D(torch.cat([xN, x1])).float() # One pass through D (and its DDP wrapper) for both.
        return self._critic(D if D_penalty is None else D_penalty, scores, xN, x1, gp_weight, alpha)

    def _critic(self, D_penalty, scores, xN, x1, gp_weight, alpha):
        """The critic's loss from the scores of cat([xN, x1]), with the penalty's own pass through D_penalty."""
        n = xN.shape[0]
        loss = scores[:n] - scores[n:]
        if not gp_weight:
            return loss
        alpha = alpha.reshape(-1, *([1] * (xN.ndim - 1)))
        x_hat = (alpha * xN + (1 - alpha) * x1).detach().requires_grad_(True)
        score_hat = D_penalty(x_hat).float()
        grad, = torch.autograd.grad(score_hat.sum(), x_hat, create_graph=True)
        penalty = (grad.float().flatten(1).norm(dim=1) - 1).square()
        training_stats.report('Loss/D_gp', penalty)
        return loss + gp_weight * penalty

@persistence.persistent_class
class KineticEOTLoss(EOTLoss):
    """The G-step transport term weighted by 1 / (1 - t)^2 (`train.py --G-loss=kinetic`; docs/eot_benchmarks.md).

    With an exact f the weighted term is the kinetic energy int E |E[x1 | x_t] - x_t|^2 / (1 - t)^2 dt of the
    bridge's Markovian projection, whose minimiser over plans is the EOT plan (the stated, unweighted term's is
    not). Per sample that term has a standard deviation ~ (1 - t)^-1/2, so t is importance-sampled with density
    q(t) = 1 / (2 sqrt(1 - t)) (t = 1 - u^2) and weighted by (1 - t)^-2 / q(t) = 2 (1 - t)^-3/2: bounded
    variance, the same scale as the stated term, no clipping. The f-step draws t the same way (f's minimiser
    E[x1 | x_t] does not depend on how t is drawn, and f is then accurate where the G-step queries it). Use it
    with f = x + (1 - t) v (networks.VelocityDrift), so that f - x vanishes at t = 1 whatever v's error.
    """

    U_MIN = 1e-3 # u >= U_MIN keeps 1 - t >= 1e-6 in float32; the bias is far below the benchmark's floors.

    def sample_t(self, u):
        """t = 1 - u^2 (density 1 / (2 sqrt(1 - t))), with u clamped at U_MIN."""
        return 1 - u.clamp(min=self.U_MIN).square()

    def transport_weight(self, t):
        """(1 - t)^-2 / q(t) = 2 (1 - t)^-3/2."""
        return 2 * (1 - t).rsqrt() / (1 - t)

@persistence.persistent_class
class LightEOTLoss(KineticEOTLoss):
    """The `light` G-step (`train.py --g-loss=light`, vector data; docs/eot_benchmarks.md): G is fitted to the plan
    of a Schrodinger potential V learned from the two marginals (models.light_sb.LightPotential) by the energy
    score, a proper scoring rule whose minimiser over laws of G(x, .) is V's conditional law pi_V(. | x); f
    regresses the bridge of V's plan with KineticEOTLoss's f-step (t = 1 - u^2, f = x + (1 - t) v).
    """

    SAMPLES = 4 # G's outputs per input in the energy score.

    def energy_score(self, ys, y):
        """E|Y - y| - E|Y - Y'| / 2 per input, unbiased over ys [m, N, ...] (m >= 2 draws of G(x_i, .)) for one
        target draw y [N, ...] of pi(. | x_i)."""
        m = ys.shape[0]
        ys, y = ys.flatten(2).float(), y.flatten(1).float()
        to_target = (ys - y[None]).norm(dim=-1).mean(0)
        between = (ys[:, None] - ys[None, :]).norm(dim=-1).sum((0, 1)) / (m * (m - 1))
        training_stats.report('Loss/G_spread', between)
        return to_target - between / 2

G_LOSSES = dict(stated=EOTLoss, kinetic=KineticEOTLoss, light=LightEOTLoss)
