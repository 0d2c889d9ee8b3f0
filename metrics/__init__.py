"""Evaluation metrics for image translation and sampling.

- `metrics.detector`: the Inception-v3 feature detector used for FID (and a seeded stand-in for tests).
- `metrics.fid`: image quantisation, detector feature statistics and the Frechet distance.
- `metrics.precision_recall`: improved precision and recall (k-NN feature manifolds).

Conventions (detector resolution, quantisation, reference split) are in docs/metrics.md.
"""
