"""Entropic OT between Gaussians in closed form, and the (c)BW2-UVP quality measures.

The EOT problem with cost |x - y|^2 / 2 and entropy eps (docs/architecture.md: the bridge of volatility
sqrt(gamma) solves it with eps = gamma) between N(m0, S0) and N(m1, S1) has a Gaussian plan with
cross-covariance (Janati et al. 2020, "Entropic OT between (unbalanced) Gaussian measures has a closed
form", with sigma^2 = eps):

    D = (4 S0^1/2 S1 S0^1/2 + eps^2 I)^1/2,    C = 1/2 (S0^1/2 D S0^-1/2 - eps I),

joint covariance [[S0, C], [C^T, S1]], and conditionals y | x ~ N(m1 + C^T S0^-1 (x - m0), S1 - C^T S0^-1 C).

Quality measures, as in the ENOT / EOT benchmark code (Gushchin et al. 2023):
    BW2-UVP(p_hat, p) = 100 * W2^2(N(mean, cov of p_hat samples), p) / Var(p)             [%]
    cBW2-UVP(pi_hat, pi) = 100 * E_{x~p0} W2^2(N fitted to pi_hat(.|x), pi(.|x)) / Var(p1)  [%]
where W2 is the Bures-Wasserstein distance and Var the trace of the covariance. (The benchmark code
halves both W2^2 and Var, which leaves the ratio unchanged.)

`bridge_objective` evaluates, for any Gaussian plan, the population value of the transport term of the
one-step EOT G-step (docs/architecture.md), with uniform t weights as stated there or with the kinetic-energy
weights 1 / (1 - t)^2 of the Schrodinger bridge; `bridge_objective_optimum` minimises it over plans, and
`markovian_projection` gives the plan the f-SDE samples. With uniform weights the minimiser is not the
EOT plan (docs/eot_benchmarks.md); the 1 / (1 - t)^2-weighted G-step is models.eot_loss.KineticEOTLoss
(`train.py --G-loss=kinetic`).
"""

import dataclasses

import numpy as np
import torch

#----------------------------------------------------------------------------
# Linear algebra.

def _sym(a):
    return (a + np.swapaxes(a, -1, -2)) / 2


def sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix [..., D, D] (eigh; negative eigenvalues
    from round-off are clipped to 0)."""
    w, v = np.linalg.eigh(_sym(np.asarray(a, dtype=np.float64)))
    return (v * np.sqrt(np.clip(w, 0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)


def _check_cov(cov, name):
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f'{name} must be a square matrix [D, D]; got shape {list(cov.shape)}')
    if not np.allclose(cov, cov.T, rtol=1e-8, atol=1e-10):
        raise ValueError(f'{name} is not symmetric (max asymmetry {np.abs(cov - cov.T).max():.3g}); pass (S + S.T) / 2')
    low = np.linalg.eigvalsh(cov).min()
    if low <= 0:
        raise ValueError(f'{name} is not positive definite (smallest eigenvalue {low:.3g})')
    return _sym(cov)


def _check_mean(mean, dim, name):
    mean = np.zeros(dim) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
    if mean.shape != (dim,):
        raise ValueError(f'{name} must have shape [{dim}]; got {list(mean.shape)}')
    return mean

#----------------------------------------------------------------------------
# Gaussian plans.

@dataclasses.dataclass(frozen=True, eq=False)
class GaussianPlan:
    """A Gaussian coupling of N(mean0, cov0) and N(mean1, cov1) with cross-covariance `cross` = Cov(x, y).

    `eps` records the entropy when the plan is the EOT plan (None otherwise).
    """
    mean0: np.ndarray
    cov0: np.ndarray
    mean1: np.ndarray
    cov1: np.ndarray
    cross: np.ndarray
    eps: float = None

    @property
    def dim(self):
        return self.cov0.shape[0]

    @property
    def joint_mean(self):
        return np.concatenate([self.mean0, self.mean1])

    @property
    def joint_cov(self):
        """[[S0, C], [C^T, S1]], shape [2D, 2D]."""
        return np.block([[self.cov0, self.cross], [self.cross.T, self.cov1]])

    @property
    def cond_matrix(self):
        """A = C^T S0^-1, so that E[y | x] = mean1 + A (x - mean0)."""
        return np.linalg.solve(self.cov0, self.cross).T

    @property
    def cond_cov(self):
        """Cov(y | x) = S1 - C^T S0^-1 C (the same for every x)."""
        return _sym(self.cov1 - self.cross.T @ np.linalg.solve(self.cov0, self.cross))

    def conditional_mean(self, x):
        """E[y | x] for x [N, D] -> [N, D]."""
        x = np.asarray(x, dtype=np.float64)
        return self.mean1 + (x - self.mean0) @ self.cond_matrix.T

    def sample(self, num, rng):
        """`num` pairs (x [num, D], y [num, D]) from the plan, with numpy Generator `rng`."""
        x = self.mean0 + rng.normal(size=(num, self.dim)) @ np.linalg.cholesky(self.cov0).T
        return x, self.sample_conditional(x, 1, rng)[:, 0]

    def sample_conditional(self, x, repeats, rng):
        """`repeats` draws of y | x for each row of x [N, D]; returns [N, repeats, D]."""
        x = np.asarray(x, dtype=np.float64)
        noise = rng.normal(size=(x.shape[0], repeats, self.dim)) @ sqrtm_psd(self.cond_cov)
        return self.conditional_mean(x)[:, None, :] + noise

    def transport_cost(self):
        """E |x - y|^2 / 2 under the plan."""
        diff = self.mean0 - self.mean1
        return 0.5 * (diff @ diff + np.trace(self.cov0) + np.trace(self.cov1) - 2 * np.trace(self.cross))


def gaussian_eot_plan(mean0, cov0, mean1, cov1, eps):
    """The entropic OT plan (cost |x - y|^2 / 2, entropy eps >= 0) between N(mean0, cov0) and N(mean1, cov1).

    Janati et al. 2020 with sigma^2 = eps: C = 1/2 (S0^1/2 D S0^-1/2 - eps I), D = (4 S0^1/2 S1 S0^1/2 + eps^2 I)^1/2.
    eps = 0 gives the deterministic OT (Monge) plan. Means may be None (zero). Returns a GaussianPlan.
    """
    cov0, cov1 = _check_cov(cov0, 'cov0'), _check_cov(cov1, 'cov1')
    if cov0.shape != cov1.shape:
        raise ValueError(f'cov0 and cov1 differ in shape: {list(cov0.shape)} vs {list(cov1.shape)}')
    if not eps >= 0:
        raise ValueError(f'eps must be >= 0; got {eps}')
    dim = cov0.shape[0]
    mean0, mean1 = _check_mean(mean0, dim, 'mean0'), _check_mean(mean1, dim, 'mean1')
    eye = np.eye(dim)
    s0_half = sqrtm_psd(cov0)
    d = sqrtm_psd(4 * s0_half @ cov1 @ s0_half + eps ** 2 * eye)
    cross = 0.5 * (s0_half @ d @ np.linalg.inv(s0_half) - eps * eye)   # Janati et al. 2020, Theorem 1.
    return GaussianPlan(mean0, cov0, mean1, cov1, cross, float(eps))

#----------------------------------------------------------------------------
# Bures-Wasserstein distances and UVP measures.

def bw2_squared(mean_a, cov_a, mean_b, cov_b):
    """W2^2 between N(mean_a, cov_a) and N(mean_b, cov_b) for the cost |x - y|^2:
    |ma - mb|^2 + tr A + tr B - 2 tr (A^1/2 B A^1/2)^1/2. Batched over leading dimensions of the covs."""
    cov_a, cov_b = np.asarray(cov_a, dtype=np.float64), np.asarray(cov_b, dtype=np.float64)
    a_half = sqrtm_psd(cov_a)
    cross = np.linalg.eigvalsh(_sym(a_half @ cov_b @ a_half))
    diff = np.asarray(mean_a, dtype=np.float64) - np.asarray(mean_b, dtype=np.float64)
    return ((diff ** 2).sum(-1) + np.trace(cov_a, axis1=-2, axis2=-1) + np.trace(cov_b, axis1=-2, axis2=-1)
            - 2 * np.sqrt(np.clip(cross, 0, None)).sum(-1))


def _fit(samples):
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 2 or samples.shape[0] < 2:
        raise ValueError(f'need samples [N >= 2, D]; got shape {list(samples.shape)}')
    return samples.mean(0), np.atleast_2d(np.cov(samples.T))


def bw2_uvp(samples, mean, cov):
    """BW2-UVP (%) of samples [N, D] against N(mean, cov): 100 W2^2(Gaussian fit, target) / tr(cov)."""
    m, c = _fit(samples)
    return 100 * float(bw2_squared(m, c, mean, cov)) / float(np.trace(cov))


def plan_bw2_uvp(x, y, plan):
    """BW2-UVP (%) of the joint samples [x, y] ([N, D] each) against the plan's joint Gaussian
    (the plan measure of the ENOT paper's Gaussian experiments)."""
    return bw2_uvp(np.concatenate([x, y], axis=1), plan.joint_mean, plan.joint_cov)


def cbw2_uvp(x, y, plan, chunk=256):
    """cBW2-UVP (%) of conditional samples against a Gaussian plan.

    x: [N, D] inputs; y: [N, R, D], R >= 2 draws of the model's y | x for each input.
    Returns 100 * mean_i W2^2(N(fit of y[i]), plan(. | x[i])) / tr(cov1). With finite R the Gaussian
    fit is noisy, which biases the value upwards; compare with the same measure on exact plan samples.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if y.ndim != 3 or y.shape[0] != x.shape[0] or y.shape[2] != x.shape[1] or y.shape[1] < 2:
        raise ValueError(f'cbw2_uvp needs x [N, D] and y [N, R >= 2, D]; got {list(x.shape)} and {list(y.shape)}')
    cond_half = sqrtm_psd(plan.cond_cov)
    true_means = plan.conditional_mean(x)
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        yc = y[i:i + chunk]
        mu = yc.mean(1)
        dev = yc - mu[:, None, :]
        cov = dev.transpose(0, 2, 1) @ dev / (yc.shape[1] - 1)
        # tr (Sc^1/2 S Sc^1/2)^1/2 = tr (S^1/2 Sc S^1/2)^1/2: one eigvalsh per input, Sc^1/2 shared.
        eig = np.linalg.eigvalsh(_sym(cond_half @ cov @ cond_half))
        w2 = (((mu - true_means[i:i + chunk]) ** 2).sum(-1) + np.trace(cov, axis1=1, axis2=2)
              + np.trace(plan.cond_cov) - 2 * np.sqrt(np.clip(eig, 0, None)).sum(-1))
        total += w2.sum()
    return 100 * total / x.shape[0] / float(np.trace(plan.cov1))


def plan_cbw2_uvp(plan, reference):
    """Population cBW2-UVP (%) of Gaussian plan `plan` against `reference` (same source law), exactly:
    E_x |(A - A_ref)(x - m0)|^2 + |m1 - m1_ref|^2 = tr((A - A_ref) S0 (A - A_ref)^T) + ..., plus the BW2^2
    of the conditional covariances, over tr(cov1 of reference)."""
    da = plan.cond_matrix - reference.cond_matrix
    dm = plan.mean1 - reference.mean1 + (reference.mean0 - plan.mean0) @ plan.cond_matrix.T
    means = np.trace(da @ reference.cov0 @ da.T) + dm @ dm
    covs = bw2_squared(np.zeros(plan.dim), plan.cond_cov, np.zeros(plan.dim), reference.cond_cov)
    return 100 * float(means + covs) / float(np.trace(reference.cov1))

#----------------------------------------------------------------------------
# The transport term of the one-step EOT G-step, in population, for Gaussian plans.

WEIGHTS = ('uniform', 'kinetic')


def bridge_transport(cross, cov0, cov1, gamma, t):
    """E |E[x1 | x_t] - x_t|^2 at times t [T] for the Gaussian plan with cross-covariance `cross` [D, D].

    x_t = (1 - t) x0 + t x1 + sqrt(gamma t (1 - t)) n is the bridge point of docs/architecture.md and E[x1 | x_t]
    the optimal f, so this is the population value of the G-step transport term at t (times D: the loss
    averages over coordinates), less the mean term (1 - t)^2 |m1 - m0|^2, which no plan changes.
    Torch tensors (float64); returns [T], differentiable in `cross`.
    """
    t = torch.as_tensor(t).to(cross)[:, None, None]
    eye = torch.eye(cross.shape[0], dtype=cross.dtype)
    sym_c = cross + cross.T
    s = t * (1 - t)
    var_t = (1 - t) ** 2 * cov0 + t ** 2 * cov1 + s * (sym_c + gamma * eye)   # Cov(x_t)
    k_t = (1 - t) * cross.T + t * cov1                                          # Cov(x1, x_t)
    explained = (k_t * torch.linalg.solve(var_t, k_t.transpose(1, 2)).transpose(1, 2)).sum((1, 2))
    t = t[:, 0, 0]
    # E|x1 - x_t|^2 - E tr Var(x1 | x_t) = E|E[x1 | x_t] - x_t|^2 (less the mean term).
    return ((1 - t) ** 2 * torch.trace(cov0 + cov1 - sym_c) + gamma * t * (1 - t) * cross.shape[0]
            - torch.trace(cov1) + explained)


def _t_nodes(num, weight, t_max=None):
    """Gauss-Legendre nodes on (0, 1) and weights times w(t): 1 ('uniform') or 1 / (1 - min(t, t_max))^2
    ('kinetic'; t_max=None: no clip). With a clip the two sides of t_max get `num` nodes each."""
    if weight not in WEIGHTS:
        raise ValueError(f'weight must be one of {WEIGHTS}; got {weight!r}')
    z, w = np.polynomial.legendre.leggauss(num)
    pieces = [(0.0, 1.0)] if weight == 'uniform' or t_max is None else [(0.0, t_max), (t_max, 1.0)]
    t = np.concatenate([a + (z + 1) / 2 * (b - a) for a, b in pieces])
    w = np.concatenate([w / 2 * (b - a) for a, b in pieces])
    if weight == 'kinetic':
        w = w / (1 - np.minimum(t, 1 if t_max is None else t_max)) ** 2
    return torch.as_tensor(t), torch.as_tensor(w)


def bridge_objective(cross, cov0, cov1, gamma, weight='uniform', nodes=96, t_max=None):
    """int_0^1 w(t) bridge_transport(t) dt: the population G-step transport term of a Gaussian plan.

    weight 'uniform' is the stated algorithm (t ~ U(0, 1), no weight); 'kinetic' weights by 1 / (1 - t)^2,
    which makes it the kinetic energy int E |drift|^2 dt of the bridge's Markovian projection, whose minimiser
    is the EOT plan with eps = gamma; t_max clips that weight at 1 / (1 - t_max)^2 (a sampled loss must
    bound it somehow: models.eot_loss.KineticEOTLoss draws t = 1 - u^2 with u >= U_MIN, i.e. t <= 1 - U_MIN^2).
    Torch tensors in and out.
    """
    t, w = _t_nodes(nodes, weight, t_max)
    return (w.to(cross) * bridge_transport(cross, cov0, cov1, gamma, t)).sum()


def _contraction(w):
    # K = W L^-T with L L^T = I + W^T W (Cholesky): K^T K = I - L^-1 L^-T, a strict contraction, and every
    # strict contraction K is reached (W = K L^T with L L^T = (I - K^T K)^-1). Cholesky, not eigh, so
    # that gradients stay finite where I + W^T W has repeated eigenvalues (e.g. at W = 0).
    chol = torch.linalg.cholesky(torch.eye(w.shape[1], dtype=w.dtype) + w.T @ w)
    return torch.linalg.solve_triangular(chol, w.T, upper=False).T


def _uncontraction(k):
    chol = np.linalg.cholesky(np.linalg.inv(np.eye(k.shape[1]) - k.T @ k))
    return k @ chol


def bridge_objective_optimum(plan, gamma, weight='uniform', start=None, nodes=96, t_max=None, max_iter=500):
    """Minimise bridge_objective over all Gaussian couplings of plan's marginals, by L-BFGS from the
    cross-covariance `start` (default plan.cross).

    Couplings are C = S0^1/2 K S1^1/2 with K a strict contraction. Returns (GaussianPlan, objective value).
    An optimum on the boundary (a deterministic map) is approached but not reached.
    """
    cov0 = torch.as_tensor(plan.cov0)
    cov1 = torch.as_tensor(plan.cov1)
    h0, h1 = sqrtm_psd(plan.cov0), sqrtm_psd(plan.cov1)
    k0 = np.linalg.solve(h0, plan.cross if start is None else np.asarray(start, dtype=np.float64)) @ np.linalg.inv(h1)
    u, sv, vt = np.linalg.svd(k0)
    k0 = (u * np.clip(sv, 0, 1 - 1e-6)) @ vt
    w = torch.tensor(_uncontraction(k0), requires_grad=True)
    h0t, h1t = torch.as_tensor(h0), torch.as_tensor(h1)
    objective = lambda: bridge_objective(h0t @ _contraction(w) @ h1t, cov0, cov1, gamma, weight, nodes, t_max)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        cross = (h0t @ _contraction(w) @ h1t).numpy()
        value = float(objective())
    return GaussianPlan(plan.mean0, plan.cov0, plan.mean1, plan.cov1, cross, None), value


def markovian_projection(plan, gamma, steps=2000):
    """The coupling (X0, X1) of the SDE dX = (E[x1 | x_t = X] - X) / (1 - t) dt + sqrt(gamma) dW from X0 ~ plan's
    source, where E[x1 | x_t] is taken under the bridge mixture of `plan` (what the f-SDE samples when f is
    exact). The drift is linear, so E[X_t | X0] = mean + Phi_t (X0 - mean0) with dPhi/dt = (A_t - I) / (1 - t) Phi,
    A_t = Cov(x1, x_t) Cov(x_t)^-1, integrated by the midpoint (RK2) rule; Cov(X0, X1) = S0 Phi_1^T. Returns a
    GaussianPlan (its target law is plan's, in continuous time).
    """
    eye = np.eye(plan.dim)
    sym_c = plan.cross + plan.cross.T

    def rate(t):
        var_t = (1 - t) ** 2 * plan.cov0 + t ** 2 * plan.cov1 + t * (1 - t) * (sym_c + gamma * eye)
        a_t = np.linalg.solve(var_t, (1 - t) * plan.cross + t * plan.cov1).T   # Cov(x1, x_t) Cov(x_t)^-1
        return (a_t - eye) / (1 - t)

    phi = eye.copy()
    h = 1.0 / steps
    for k in range(steps):
        half = phi + h / 2 * rate(k * h) @ phi
        phi = phi + h * rate((k + 0.5) * h) @ half
    return GaussianPlan(plan.mean0, plan.cov0, plan.mean1, plan.cov1, plan.cov0 @ phi.T, None)
