"""benchmarks.dpmot_overhead runs end to end on a tiny denoiser and prints its table (timings are not checked)."""

import re

import pytest

from click.testing import CliRunner

from benchmarks import dpmot_overhead


def test_prints_the_share_of_the_network_time_for_top1_and_topk():
    res = CliRunner().invoke(dpmot_overhead.main, ['--device=cpu', '--rounds=1', '--model-channels=4',
                                                   '--num-targets=50', '--threads=1'])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert 'Heun, K = 5 (9 NFE)' in res.output
    rows = re.findall(r'^(top-\d)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)$', res.output, flags=re.M)
    assert [r[0] for r in rows] == ['top-1', 'top-3'], res.output
    for _, net_s, rest_s, share, _ in rows:
        assert float(share) == pytest.approx(100 * float(rest_s) / float(net_s), rel=0.05, abs=0.02)
