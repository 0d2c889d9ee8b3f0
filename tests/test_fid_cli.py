"""fid.py end to end with the seeded stand-in detector (never the real one: tests do not download)."""

import io
import json
import os
import pickle
import re
import socket
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from metrics import detector as detector_lib
from metrics import fid as fid_lib
from tests.launch import REPO, torchrun
from data.dataset import ImageFolderDataset

STANDIN = 'standin:0'
# 20 images < 2048 feature dimensions: every FID here takes the near-singular path, by design.
pytestmark = pytest.mark.filterwarnings('ignore:FID.*near-singular:RuntimeWarning')
COMMON = ['--detector', STANDIN, '--workers', '0', '--device', 'cpu', '--batch', '8']

#----------------------------------------------------------------------------



def png_bytes(arr):
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()


def write_images(path, num, seed, low, high, kind):
    """`num` random 16x16 RGB PNGs with pixel values in [low, high), as a folder or a zip."""
    rng = np.random.default_rng(seed)
    images = rng.integers(low, high, size=[num, 16, 16, 3], dtype=np.uint8)
    if kind == 'dir':
        os.makedirs(path)
        for i, arr in enumerate(images):
            with open(os.path.join(path, f'img{i:04d}.png'), 'wb') as f:
                f.write(png_bytes(arr))
    else:
        with zipfile.ZipFile(path, 'w') as zf:
            for i, arr in enumerate(images):
                zf.writestr(f'img{i:04d}.png', png_bytes(arr))
    return str(path)


@pytest.fixture
def image_sets(tmp_path):
    return dict(a_dir=write_images(tmp_path / 'a', 20, seed=0, low=0, high=256, kind='dir'),
                a_zip=write_images(tmp_path / 'a.zip', 20, seed=0, low=0, high=256, kind='zip'),
                b_dir=write_images(tmp_path / 'b', 20, seed=1, low=60, high=120, kind='dir'))


def invoke(*args, env=None):
    result = CliRunner().invoke(fid.main, [str(a) for a in args], env=env, catch_exceptions=False)
    return result


def parse_metrics(output):
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'\b(fid|precision|recall): (\S+)', output)}

#----------------------------------------------------------------------------

def test_ref_then_calc_same_and_different_sets(image_sets, tmp_path):
    dest = tmp_path / 'out' / 'stats.npz'
    res = invoke('ref', '--data', image_sets['a_dir'], '--dest', dest, *COMMON)
    assert res.exit_code == 0, res.output
    assert 'NOT FID' in res.output
    # The file holds the stand-in features' mean and covariance, computed independently here.
    mu, sigma, meta = fid_lib.load_ref_stats(str(dest), return_meta=True)
    assert meta['detector'] == STANDIN and meta['num_images'] == 20
    net = detector_lib.StandInDetector(seed=0)
    images = torch.stack([torch.from_numpy(ImageFolderDataset(image_sets['a_dir'])[i][0]) for i in range(20)])
    feats = net(images, return_features=True).double().numpy()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-7)

    # The same images (from a zip) against these statistics: FID ~ 0. A different set: FID > 0.
    same = invoke('calc', '--images', image_sets['a_zip'], '--ref', dest, *COMMON)
    assert same.exit_code == 0, same.output
    other = invoke('calc', '--images', image_sets['b_dir'], '--ref', dest, '--out', tmp_path / 'r.json', *COMMON)
    assert other.exit_code == 0, other.output
    fid_same, fid_other = parse_metrics(same.output)['fid'], parse_metrics(other.output)['fid']
    assert fid_other > 1e-2 and abs(fid_same) < 1e-5 * fid_other
    record = json.loads((tmp_path / 'r.json').read_text())
    assert record['fid'] == pytest.approx(fid_other, rel=1e-5) and record['detector'] == STANDIN


def test_calc_precision_recall_and_fid_from_reference_images(image_sets):
    res = invoke('calc', '--images', image_sets['a_zip'], '--ref-data', image_sets['a_dir'],
                 '--metrics', 'fid', '--pr', '--num', '12', '--ref-num', '12', *COMMON)
    assert res.exit_code == 0, res.output
    got = parse_metrics(res.output)
    # Same 12 images (same seed, same order) on both sides: precision = recall = 1, FID ~ 0.
    assert got['precision'] == 1.0 and got['recall'] == 1.0 and abs(got['fid']) < 1e-3


def test_calc_usage_errors(image_sets, tmp_path):
    res = CliRunner().invoke(fid.main, ['calc', '--images', image_sets['a_dir'], '--metrics', 'pr', *COMMON])
    assert res.exit_code == 2 and '--ref-data' in res.output
    res = CliRunner().invoke(fid.main, ['calc', '--images', image_sets['a_dir'], '--metrics', 'fid,kid', *COMMON])
    assert res.exit_code == 2 and 'kid' in res.output
    res = CliRunner().invoke(fid.main, ['calc', '--images', image_sets['a_dir'], '--num', '21', '--ref-data',
                                        image_sets['a_dir'], *COMMON])
    assert res.exit_code == 1 and 'only 20' in res.output
    # Reference statistics from another detector are refused.
    dest = tmp_path / 's.npz'
    fid_lib.save_ref_stats(dest, np.zeros(2048), np.eye(2048), detector='standin:1')
    res = CliRunner().invoke(fid.main, ['calc', '--images', image_sets['a_dir'], '--ref', str(dest), *COMMON])
    assert res.exit_code == 1 and 'standin:1' in res.output and '--detector' in res.output


def test_offline_detector_error_names_url_and_fix(image_sets, tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/x.pkl'
    env = {'EOT_CACHE_DIR': str(tmp_path / 'cache'), detector_lib.DETECTOR_ENV: url}
    args = ['ref', '--data', image_sets['a_dir'], '--dest', str(tmp_path / 's.npz'), '--workers', '0', '--device', 'cpu']
    res = CliRunner().invoke(fid.main, args, env=env) # The detector comes from the environment variable.
    assert res.exit_code == 1
    assert url in res.output and '--detector=' in res.output and 'Traceback' not in res.output
    assert not (tmp_path / 's.npz').exists()


def test_help_states_conventions():
    res = invoke('calc', '--help')
    assert 'standin:SEED' in res.output and 'NOT FID' in res.output
    assert '299x299' in res.output and 'train split' in res.output


def test_ref_two_processes_match_one(image_sets, tmp_path):
    one, two = tmp_path / 'one.npz', tmp_path / 'two.npz'
    assert invoke('ref', '--data', image_sets['a_zip'], '--dest', one, *COMMON).exit_code == 0
    res = torchrun(os.path.join(REPO, 'fid.py'), 'ref', '--data', image_sets['a_zip'], '--dest', two, *COMMON,
                   nproc=2, env={'EOT_CACHE_DIR': str(tmp_path / 'cache')})
    assert res.stdout.count('Saved') == 1 # Only rank 0 writes.
    mu1, sigma1, meta1 = fid_lib.load_ref_stats(str(one), return_meta=True)
    mu2, sigma2, meta2 = fid_lib.load_ref_stats(str(two), return_meta=True)
    assert meta1['num_images'] == meta2['num_images'] == 20
    np.testing.assert_allclose(mu2, mu1, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sigma2, sigma1, rtol=1e-5, atol=1e-8)


def test_calc_with_precision_recall_two_processes_match_one(image_sets, tmp_path):
    # Small --pr-chunk: the distance-matrix row blocks are split between the two ranks.
    args = ['calc', '--images', image_sets['b_dir'], '--ref-data', image_sets['a_zip'], '--metrics', 'fid,pr',
            '--pr-chunk', '3', *COMMON]
    one = invoke(*args)
    assert one.exit_code == 0, one.output
    res = torchrun(os.path.join(REPO, 'fid.py'), *args, nproc=2, env={'EOT_CACHE_DIR': str(tmp_path / 'cache')})
    got1, got2 = parse_metrics(one.output), parse_metrics(res.stdout)
    assert res.stdout.count('fid: ') == 1 and set(got2) == {'fid', 'precision', 'recall'} # Rank 0 prints.
    assert got2['precision'] == got1['precision'] and got2['recall'] == got1['recall']
    assert got2['fid'] == pytest.approx(got1['fid'], rel=1e-4)


def test_fid_script_reexports_the_distance():
    assert fid.calculate_fid_from_inception_stats is fid_lib.calculate_fid_from_inception_stats

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# The field's formats: ADM-style batches, edm / ADM reference statistics, IS and the mode-mixture ratio.

def _images_of(path):
    ds = ImageFolderDataset(path)
    return np.stack([ds[i][0] for i in range(len(ds))])               # uint8 [N, C, H, W]


def test_an_adm_batch_scores_as_its_pngs_and_reference_files_of_edm_and_adm_are_read(image_sets, tmp_path):
    a = _images_of(image_sets['a_dir'])
    np.savez(tmp_path / 'batch.npz', arr_0=a.transpose(0, 2, 3, 1), arr_1=np.arange(20))
    stats = tmp_path / 'b-stats.npz'
    assert invoke('ref', '--data', image_sets['b_dir'], '--dest', stats, *COMMON).exit_code == 0
    mu, sigma = fid_lib.load_ref_stats(str(stats))
    np.savez(tmp_path / 'edm-ref.npz', mu=mu, sigma=sigma)                          # edm's fid.py ref: mu, sigma only
    np.savez(tmp_path / 'adm-ref.npz', arr_0=_images_of(image_sets['b_dir']).transpose(0, 2, 3, 1), mu=mu, sigma=sigma,
             mu_s=np.zeros(7), sigma_s=np.eye(7))                                   # an ADM reference batch
    values = []
    for images in (image_sets['a_dir'], tmp_path / 'batch.npz'):
        for ref in (stats, tmp_path / 'edm-ref.npz', tmp_path / 'adm-ref.npz'):
            res = invoke('calc', '--images', images, '--ref', ref, '--metrics=fid,is', '--splits=4', *COMMON)
            assert res.exit_code == 0, res.output
            values.append(re.findall(r'\b(fid|is_mean|is_std): (\S+)', res.output))
    assert all(v == values[0] for v in values) and len(values[0]) == 3
    # An ADM reference batch's images against its own statistics: FID ~ 0 (the check of a detector's agreement).
    res = invoke('calc', '--images', tmp_path / 'adm-ref.npz', '--ref', tmp_path / 'adm-ref.npz', *COMMON)
    assert res.exit_code == 0 and abs(parse_metrics(res.output)['fid']) < 1e-3, res.output
    res = CliRunner().invoke(fid.main, ['calc', '--images', image_sets['a_dir'], '--ref', str(tmp_path / 'batch.npz'),
                                        *COMMON])
    assert res.exit_code == 1 and 'pass it as --ref-data' in res.output


def _classifier(path):
    """A small Sequential (conv, pooling, linear) whose logits follow the images' mean colours."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(6, 6, 1, bias=False), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(6, 4)).eval()
    with torch.no_grad():
        net[-1].weight.mul_(6)
    with open(path, 'wb') as f:
        pickle.dump(net, f)
    return net


def _coloured_images(path, num=40):
    """PNGs of random flat colours with noise: a classifier of colours spreads its probabilities over them."""
    rng = np.random.default_rng(5)
    os.makedirs(path)
    for i in range(num):
        arr = np.clip(rng.integers(0, 256, size=[1, 1, 3]) + rng.normal(0, 20, size=[16, 16, 3]), 0, 255)
        with open(os.path.join(path, f'{i:04d}.png'), 'wb') as f:
            f.write(png_bytes(arr.astype(np.uint8)))
    return str(path)


def test_is_pr_and_mmr_with_a_pickled_and_a_safely_exported_classifier(image_sets, tmp_path):
    import generate
    net = _classifier(tmp_path / 'clf.pkl')
    export = tmp_path / 'clf-safe'
    res = CliRunner().invoke(generate.main, [f'--network={tmp_path / "clf.pkl"}', f'--export-safe={export}'])
    assert res.exit_code == 0, res.output
    assert json.loads((export / 'network.json').read_text())['networks']['classifier']['class_name'] == 'torch.nn.Sequential'
    outs = []
    images_dir = _coloured_images(tmp_path / 'coloured')
    for clf in (tmp_path / 'clf.pkl', export):
        res = invoke('calc', '--images', images_dir, '--ref-data', image_sets['b_dir'],
                     '--metrics=fid,is,pr,mmr', f'--classifier={clf}', '--splits=5', '--out', tmp_path / 'r.json', *COMMON)
        assert res.exit_code == 0, res.output
        outs.append(json.loads((tmp_path / 'r.json').read_text()))
    assert {k: v for k, v in outs[0].items() if k != 'classifier'} == {k: v for k, v in outs[1].items() if k != 'classifier'}
    # Independently: the stand-in's probabilities (no output bias) and the classifier's softmax of x / 127.5 - 1.
    images = torch.as_tensor(_images_of(images_dir))
    probs = detector_lib.StandInDetector(seed=0)(images, no_output_bias=True).double().numpy()
    scores = [np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1))) for p in np.split(probs, 5)]
    assert outs[0]['is_mean'] == pytest.approx(np.mean(scores), rel=1e-5)
    soft = torch.softmax(net(images.float() / 127.5 - 1), dim=1).detach().numpy()
    want = {str(t): float(np.mean([(row >= t).sum() >= 2 for row in soft])) for t in (0.1, 0.2, 0.3, 0.4)}
    assert outs[0]['mmr'] == want and len(set(want.values())) > 1, want
    assert 0 <= outs[0]['precision'] <= 1 and outs[0]['fid'] > 0


def test_mmr_and_classifier_errors(image_sets, tmp_path):
    cases = [(['--metrics=mmr'], 2, 'needs --classifier'),
             (['--classifier', str(tmp_path / 'none.pkl')], 2, 'used by mmr alone'),
             (['--metrics=mmr', '--classifier', str(tmp_path / 'none.pkl')], 1, 'no such file'),
             (['--metrics=is,mmr,fid2'], 2, 'fid2')]
    torch.save(torch.nn.Linear(3, 2), tmp_path / 'lin.pkl')    # a zip, not a pickle of ours
    with open(tmp_path / 'flat.pkl', 'wb') as f:
        pickle.dump(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 1)), f)
    cases.append((['--metrics=mmr', '--classifier', str(tmp_path / 'flat.pkl')], 1, 'must return class logits [N, K]'))
    for args, code, expect in cases:
        res = CliRunner().invoke(fid.main, ['calc', '--images', image_sets['a_dir'], *args, *COMMON])
        assert res.exit_code == code and expect in res.output and 'Traceback' not in res.output, (args, res.output)


def test_a_bad_dest_or_out_is_a_one_line_error_before_any_work(image_sets, tmp_path):
    (tmp_path / 'file').write_text('x')
    cases = [(['ref', '--data', image_sets['a_dir'], '--dest', str(tmp_path / 'file' / 's.npz')], 'is a file'),
             (['ref', '--data', image_sets['a_dir'], '--dest', str(tmp_path)], 'is a folder'),
             (['calc', '--images', image_sets['a_dir'], '--metrics=is', '--out', str(tmp_path / 'file' / 'r.json')],
              'is a file')]
    for args, expect in cases:
        res = CliRunner().invoke(fid.main, [*args, *COMMON])
        assert res.exit_code == 1 and expect in res.output and isinstance(res.exception, SystemExit), (args, res.output)
        assert 'Computing' not in res.output, res.output     # refused before the images are read


def test_a_bad_detector_is_a_one_line_error(image_sets, tmp_path):
    (tmp_path / 'garbage.pkl').write_bytes(b'\x80\x04garbage')
    with open(tmp_path / 'list.pkl', 'wb') as f:
        pickle.dump([1, 2, 3], f)
    cases = [(str(tmp_path / 'garbage.pkl'), 'Cannot load the detector'), ('standin:x', 'standin:SEED'),
             (str(tmp_path / 'list.pkl'), 'not a network')]
    for spec, expect in cases:
        res = CliRunner().invoke(fid.main, ['calc', '--images', image_sets['a_dir'], '--metrics=is', '--detector', spec,
                                            '--workers', '0', '--device', 'cpu'])
        assert res.exit_code == 1 and expect in res.output and isinstance(res.exception, SystemExit), (spec, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_a_detector_over_plain_http_is_warned_about(image_sets, tmp_path):
    env = {'EOT_CACHE_DIR': str(tmp_path / 'cache'), detector_lib.DETECTOR_ENV: 'http://127.0.0.1:9/inception.pkl'}
    res = CliRunner().invoke(fid.main, ['calc', '--images', image_sets['a_dir'], '--metrics=is', '--workers', '0',
                                        '--device', 'cpu'], env=env)
    assert res.exit_code == 1 and 'Warning: --detector=http://127.0.0.1:9/inception.pkl is a pickle' in res.output
