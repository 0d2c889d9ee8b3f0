"""The mode-mixture ratio of the DPM-OT paper (Li et al. 2023): the share of samples that a classifier cannot
assign to one class, i.e. for which at least two classes get a softmax probability >= tau.

A sample drawn between two modes (two digits blended into one image) spreads its probability over their classes;
DPM-OT's OT map is meant to avoid such samples. Reported for tau = 0.1, 0.2, 0.3, 0.4 (`TAUS`), as in the paper.
The classifier is the user's: any network that maps images in model space ([-1, 1], [N, C, H, W]) to class
logits [N, K] (fid.py calc --classifier: a pickle or a safe export).
"""

import numpy as np

TAUS = (0.1, 0.2, 0.3, 0.4)

#----------------------------------------------------------------------------

def mode_mixture_ratio(probs, taus=TAUS):
    """{tau: share of rows of `probs` [N, K] with at least two entries >= tau} for every tau in `taus`.

    Rows must be probabilities (non-negative, summing to 1 within 1e-3); every tau in (0, 1].
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f'probs must be [N, K] class probabilities with N >= 1, K >= 2; got shape {list(p.shape)}')
    if not np.all(np.isfinite(p)) or (p < 0).any() or np.abs(p.sum(axis=1) - 1).max() > 1e-3:
        raise ValueError('probs must be finite, non-negative rows that sum to 1 (softmax outputs)')
    bad = [t for t in taus if not 0 < t <= 1]
    if bad:
        raise ValueError(f'thresholds must lie in (0, 1]; got {bad}')
    return {float(t): float(((p >= t).sum(axis=1) >= 2).mean()) for t in taus}

#----------------------------------------------------------------------------
