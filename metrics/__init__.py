"""Evaluation metrics for image translation and sampling.

- `metrics.detector`: the Inception-v3 feature detector used for FID (and a seeded stand-in for tests).
- `metrics.fid`: image quantisation, detector feature statistics and the Frechet distance.
- `metrics.precision_recall`: improved precision and recall (k-NN feature manifolds).
- `metrics.inception_score`: the Inception Score from the detector's class probabilities.
- `metrics.mode_mixture`: the mode-mixture ratio of the DPM-OT paper (a user's classifier).
- `metrics.npz_images`: ADM-style sample batches (.npz arr_0) as image data sets.

Conventions (detector resolution, quantisation, reference split) are in docs/metrics.md.
"""
