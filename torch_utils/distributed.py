"""Everything about ranks, devices and process-group backends, in one place.

The same code runs as a plain `python script.py` (one process, no process group, no environment
variables needed) and under `torchrun --nproc_per_node=N` on CPUs (gloo) or GPUs (nccl, one device per
local rank). Nothing here touches CUDA unless the chosen device is a CUDA device.
"""

import os
import signal
import threading

import torch

_state = dict(device=None)

#----------------------------------------------------------------------------

def resolve_device(choice='auto', local_rank=0):
    """Turn a --device choice ('auto', 'cpu', 'cuda' or 'cuda:N') into a torch.device.

    'auto' picks CUDA when torch sees a GPU and the CPU otherwise. Under torchrun, 'cuda' means the
    GPU of this process's local rank.
    """
    choice = str(choice).lower()
    if choice == 'auto':
        choice = 'cuda' if torch.cuda.is_available() else 'cpu'
    if choice == 'cpu':
        return torch.device('cpu')
    if choice.startswith('cuda'):
        if not torch.cuda.is_available():
            raise RuntimeError(f'--device={choice} was requested but torch sees no CUDA device; use --device=cpu or auto')
        if choice == 'cuda':
            return torch.device('cuda', local_rank % torch.cuda.device_count())
        return torch.device(choice)
    raise ValueError(f'Unknown device "{choice}": use auto, cpu, cuda or cuda:N')


def init(device='auto', backend=None, timeout_s=1800):
    """Set up this process: pick its device and, under torchrun, join the process group.

    Args:
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        backend: None picks nccl for CUDA devices and gloo for the CPU.
        timeout_s: collective-operation timeout.
    Returns:
        The torch.device of this process.
    """
    import datetime
    import torch.distributed as dist

    under_launcher = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = resolve_device(device, local_rank)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if under_launcher and not dist.is_initialized():
        if backend is None:
            backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if backend == 'nccl':
            kwargs['device_id'] = dev
        dist.init_process_group(**kwargs)
    _state.update(device=dev)
    return dev


def shutdown():
    """Leave the process group, if any (call at the end of a script)."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()

#----------------------------------------------------------------------------

def is_distributed():
    """True when a process group with more than zero peers is active."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return torch.distributed.get_rank() if is_distributed() else 0


def get_world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1


def device():
    """The device chosen by init(), or the CPU if init() has not been called."""
    return _state['device'] if _state['device'] is not None else torch.device('cpu')


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def barrier():
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_(tensor, op='sum'):
    """In-place all-reduce ('sum', 'max', 'min' or 'mean'); a no-op in a single process.

    gloo cannot reduce every dtype on every device; tensors are reduced on their own device.
    """
    if not is_distributed():
        return tensor
    ops = dict(sum=torch.distributed.ReduceOp.SUM, max=torch.distributed.ReduceOp.MAX,
               min=torch.distributed.ReduceOp.MIN, mean=torch.distributed.ReduceOp.SUM)
    torch.distributed.all_reduce(tensor, op=ops[op])
    if op == 'mean':
        tensor /= get_world_size()
    return tensor


def broadcast_object(obj, src=0):
    """Return rank `src`'s `obj` on every rank (a no-op in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=device() if device().type == 'cuda' else None)
    return box[0]


def all_gather_object(obj):
    """Return the list of every rank's `obj`."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def agree_on_seed(seed=None):
    """Rank 0's seed on every rank; a fresh random one when `seed` is None. No CUDA involved."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), 'little') & 0x7fffffff
    return int(broadcast_object(int(seed)))

#----------------------------------------------------------------------------

class StopSignals:
    """While active, SIGTERM and SIGINT ask the program to stop at its next agreed point instead of killing it.

    A cluster's preemption (SIGTERM, then SIGKILL after a grace period) or a Ctrl-C is recorded, with a line
    on the console; `requested()`, called by every rank at the same point, says on every rank whether any rank
    got one. A second Ctrl-C aborts at once (KeyboardInterrupt). Handlers are installed only in the main
    thread, and the previous ones come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            print0(f'\nReceived {signal.Signals(signum).name}: finishing the current iteration and saving a training '
                   'state (press Ctrl-C again to abort without saving)', flush=True)

    def requested(self, dev=None):
        """The first signal received by any rank (a number), or None. A collective when distributed."""
        if not is_distributed():
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device() if dev is None else dev)
        return int(all_reduce_(flag, op='max').item()) or None


def ignore_stop_signals(*_args):
    """For helper processes (DataLoader workers): leave SIGTERM and SIGINT to the main process, which stops them."""
    for signum in StopSignals.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)

#----------------------------------------------------------------------------

def default_threads(device, env=None, cpus=None, load=None):
    """CPU threads per process when none are asked for: None (keep torch's choice) on a GPU or when
    OMP_NUM_THREADS is set; on the CPU the CPUs this process may use, shared by the local processes
    (LOCAL_WORLD_SIZE), less those already busy by the 1-minute load average, at least 1. More threads than
    idle cores make OpenMP's threads wait on each other (the demo's step ran 17x slower with 2 threads on 2
    loaded cores than with 1). Returns (threads or None, a few words on why).
    """
    env = os.environ if env is None else env
    if torch.device(device).type != 'cpu':
        return None, 'torch\'s choice on a GPU'
    if env.get('OMP_NUM_THREADS'):
        return None, f'OMP_NUM_THREADS={env["OMP_NUM_THREADS"]}'
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0
    procs = max(1, int(env.get('LOCAL_WORLD_SIZE', 1)))
    idle = int(max(cpus - load, 0) + 0.5)
    threads = max(1, min(cpus // procs, idle // procs))
    return threads, f'{cpus} CPUs, load average {load:.1f}, {procs} local process(es)'


def setup_precision(allow_tf32=False, cudnn_benchmark=True, threads=None, verbose=True):
    """Set matmul/cudnn precision flags and the CPU thread count once at start-up and report them.

    TF32 is off by default so CPU and GPU results agree closely; bf16 autocast is chosen per run.
    `threads` sets torch's intra-op CPU threads (None keeps torch's default); on a busy or small
    CPU, fewer threads than cores per process often run faster.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    flags = dict(allow_tf32=allow_tf32, cudnn_benchmark=cudnn_benchmark, cpu_threads=torch.get_num_threads())
    if verbose:
        print0('Precision flags: ' + ', '.join(f'{k}={v}' for k, v in flags.items()))
    return flags


def memory_stats(dev=None):
    """Peak memory in GiB: {'cpu_mem_gb': resident set size, 'gpu_mem_gb': peak CUDA allocation or 0}."""
    import psutil
    dev = device() if dev is None else dev
    stats = dict(cpu_mem_gb=psutil.Process(os.getpid()).memory_info().rss / 2**30, gpu_mem_gb=0.0)
    if dev.type == 'cuda':
        stats['gpu_mem_gb'] = torch.cuda.max_memory_allocated(dev) / 2**30
    return stats


def reset_peak_memory(dev=None):
    dev = device() if dev is None else dev
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)

