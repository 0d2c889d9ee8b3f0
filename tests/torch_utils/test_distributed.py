"""torch_utils.distributed in one process and under torchrun with 2 gloo processes."""

import os

import pytest
import torch

from tests.launch import torchrun
from torch_utils import distributed as dist


def test_single_process_needs_no_environment(monkeypatch):
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(var, raising=False)
    dev = dist.init('cpu')
    assert dev == torch.device('cpu') and dist.device() == dev
    assert (dist.get_rank(), dist.get_world_size(), dist.is_distributed()) == (0, 1, False)
    t = torch.ones(3)
    assert torch.equal(dist.all_reduce_(t), torch.ones(3))
    assert dist.broadcast_object({'a': 1}) == {'a': 1}
    assert dist.all_gather_object(7) == [7]
    assert isinstance(dist.agree_on_seed(None), int) and dist.agree_on_seed(5) == 5


def test_resolve_device():
    assert dist.resolve_device('cpu') == torch.device('cpu')
    if not torch.cuda.is_available():
        assert dist.resolve_device('auto') == torch.device('cpu')
        with pytest.raises(RuntimeError, match='--device=cpu'):
            dist.resolve_device('cuda')
    with pytest.raises(ValueError, match='Unknown device'):
        dist.resolve_device('tpu')


def test_memory_stats_cpu():
    stats = dist.memory_stats(torch.device('cpu'))
    assert stats['cpu_mem_gb'] > 0 and stats['gpu_mem_gb'] == 0


def test_torchrun_two_gloo_processes():
    worker = os.path.join(os.path.dirname(__file__), '_dist_worker.py')
    res = torchrun(worker, 2, nproc=2)
    assert 'ALL OK' in res.stdout
    assert res.stdout.count('caught: DDP consistency check failed') == 2


# The same on CUDA (skipped where torch sees no GPU: tests/conftest.py; run by python -m benchmarks.gpu_check).

@pytest.mark.gpu
def test_cuda_device_in_one_process(monkeypatch):
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dist, '_state', dict(dist._state))          # init() must not leak the device to later tests
    dev = dist.init('cuda')
    assert dev.type == 'cuda' and dist.device() == dev and dist.resolve_device('auto').type == 'cuda'
    assert dist.resolve_device('cuda:0') == torch.device('cuda', 0)
    assert not dist.is_distributed()
    t = torch.ones(3, device=dev)
    assert torch.equal(dist.all_reduce_(t), torch.ones(3, device=dev))
    assert dist.broadcast_object({'a': 1}) == {'a': 1} and dist.agree_on_seed(5) == 5
    dist.reset_peak_memory(dev)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)    # 64 MiB
    stats = dist.memory_stats(dev)
    assert 1 / 16 <= stats['gpu_mem_gb'] < 1 and stats['cpu_mem_gb'] > 0
    del block


@pytest.mark.gpu
def test_torchrun_nccl_processes():
    # One process per GPU (nccl refuses two ranks on one device): on a one-GPU machine a single rank, which still
    # goes through the nccl process group, its collectives on CUDA tensors and the statistics reduction.
    n = min(2, torch.cuda.device_count())
    visible = os.environ.get('CUDA_VISIBLE_DEVICES') or ','.join(str(i) for i in range(n))
    worker = os.path.join(os.path.dirname(__file__), '_dist_worker.py')
    res = torchrun(worker, n, 'cuda', nproc=n, env={'CUDA_VISIBLE_DEVICES': visible})
    assert 'ALL OK (nccl, cuda:0)' in res.stdout
    assert res.stdout.count('caught: DDP consistency check failed') == (n if n > 1 else 0)


def test_stop_signals_record_the_first_signal_and_restore_the_handlers():
    import signal
    before = signal.getsignal(signal.SIGTERM)
    with dist.StopSignals() as stop:
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)            # a repeated SIGTERM changes nothing
        assert stop.requested() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):          # Ctrl-C while stopping aborts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_default_threads_leave_busy_cores_alone():
    from torch_utils.distributed import default_threads
    assert default_threads('cpu', env={}, cpus=2, load=6.2)[0] == 1     # A loaded 2-core machine: one thread.
    assert default_threads('cpu', env={}, cpus=2, load=0.1)[0] == 2     # A quiet one: both cores.
    assert default_threads('cpu', env={}, cpus=8, load=0.0)[0] == 8
    assert default_threads('cpu', env={'LOCAL_WORLD_SIZE': '4'}, cpus=16, load=3.0)[0] == 3 # 13 idle / 4 processes.
    assert default_threads('cpu', env={'LOCAL_WORLD_SIZE': '4'}, cpus=16, load=0.0)[0] == 4
    assert default_threads('cpu', env={'OMP_NUM_THREADS': '3'}, cpus=16, load=0.0)[0] is None # torch read it.
    assert default_threads('cuda', env={}, cpus=16, load=0.0)[0] is None
