"""benchmarks/real_digits.py: the split (disjoint parts, the judge never sees a digit that is trained on or
scored) and the data it builds with dataset_tool.py, on stand-in 8x8 scans (scikit-learn is not needed)."""

import numpy as np

from benchmarks import real_digits
from data.dataset import open_dataset


def _scans(per_class=12):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    return rng.integers(0, 256, size=(len(labels), 8, 8)).astype(np.uint8), labels


def test_split_is_disjoint_and_seeded():
    _, labels = _scans()
    parts = real_digits.split_parts(labels, seed=3)
    for c in (2, 3):
        got = {p: int(((labels == c) & (parts == p)).sum()) for p in real_digits.PARTS}
        assert got == dict(train=6, test=3, judge=3)
    assert (parts[(labels != 2) & (labels != 3)] == 'judge').all()
    assert (real_digits.split_parts(labels, seed=3) == parts).all()
    assert not (real_digits.split_parts(labels, seed=4) == parts).all()


def test_build_data_upscales_and_colours_every_part(tmp_path, monkeypatch):
    images, labels = _scans()
    monkeypatch.setattr(real_digits, 'load_sklearn_digits', lambda: (images, labels))
    paths = real_digits.build_data(str(tmp_path), seed=0, resolution=16)
    assert sorted(paths) == ['2_test', '2_train', '3_test', '3_train', 'judge']
    sizes = {k: len(open_dataset(p)) for k, p in paths.items()}
    assert sizes == {'2_train': 6, '3_train': 6, '2_test': 3, '3_test': 3, 'judge': 8 * 12 + 2 * 3}
    ds = open_dataset(paths['judge'], use_labels=True)
    assert ds.image_shape == [3, 16, 16]
    assert sorted(set(int(ds.get_label(i).argmax()) for i in range(len(ds)))) == list(range(10))
    img = ds[0][0].reshape(3, -1).astype(int)
    peak = img[:, img.sum(0).argmax()]
    assert peak.min() < 0.05 * peak.max() + 1 # Tinted with one saturated colour, as --colorize does.
