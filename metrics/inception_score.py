"""Inception Score (Salimans et al. 2016) from the class probabilities of the Inception-v3 detector.

IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of p(y|x) over the images, computed on `splits` equal
parts of the images (10, as in the original code and in StyleGAN3 / EDM's evaluations) and reported as the mean
and standard deviation over the parts. The probabilities are the detector's softmax without the output layer's
bias (`no_output_bias=True`), as the original TensorFlow implementation computes them.
"""

import numpy as np

#----------------------------------------------------------------------------

def inception_score(probs, splits=10):
    """(mean, std) of the Inception Score over `splits` consecutive parts of `probs` [N, K] (rows: p(y|x)).

    Rows must be probabilities (non-negative, summing to 1 within 1e-3); N >= splits. Terms with
    p(y|x) = 0 count 0 (the limit of p log p).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f'probs must be [N, K] class probabilities with K >= 2; got shape {list(p.shape)}')
    if not np.all(np.isfinite(p)) or (p < 0).any() or np.abs(p.sum(axis=1) - 1).max() > 1e-3:
        raise ValueError('probs must be finite, non-negative rows that sum to 1 (softmax outputs)')
    if not 1 <= int(splits) <= p.shape[0]:
        raise ValueError(f'splits={splits} must be between 1 and the number of images ({p.shape[0]})')
    scores = []
    for part in np.array_split(p, int(splits)):
        p_y = part.mean(axis=0, keepdims=True)
        terms = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1)) - np.log(np.where(p_y > 0, p_y, 1))), 0)
        scores.append(float(np.exp(terms.sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))

#----------------------------------------------------------------------------
