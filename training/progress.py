"""Progress within a tick: kimg/s and the ETA to the next tick and to the end of training, on one line that
updates in place on a terminal (plain lines every `interval` seconds elsewhere). Rank 0 only."""

import time

import dnnlib
from torch_utils import distributed as dist

#----------------------------------------------------------------------------

class TickProgress:
    """Call `start_tick(nimg)` when a tick starts, `update(nimg)` after every iteration and `clear()` before
    printing anything else. The rate is that of the current tick (images since it started over the time since);
    a tick ends when the image count crosses the next multiple of `tick_nimg` (training_loop's schedule, which
    passes its own `total_nimg` and `tick_nimg`)."""

    def __init__(self, total_nimg, tick_nimg, interval=60.0):
        self.total_nimg, self.tick_nimg = total_nimg, tick_nimg
        self.line = dnnlib.util.ProgressLine(interval=interval) if dist.get_rank() == 0 else None
        self.start_nimg, self.start_time = 0, time.time()

    def start_tick(self, nimg):
        self.start_nimg, self.start_time = nimg, time.time()

    def text(self, nimg, now):
        """The progress line at image count `nimg`, time `now`."""
        rate = (nimg - self.start_nimg) / max(now - self.start_time, 1e-9) # Images per second.
        tick_end = min((self.start_nimg // self.tick_nimg + 1) * self.tick_nimg, self.total_nimg)
        eta = lambda n: dnnlib.util.format_time(max(n - nimg, 0) / rate) if rate > 0 else '?'
        return (f'kimg {nimg / 1000:.3f}/{self.total_nimg / 1000:g}  {rate / 1000:.3f} kimg/s  '
                f'next tick in {eta(tick_end)}  end in {eta(self.total_nimg)}')

    def update(self, nimg):
        if self.line is not None:
            self.line.update(self.text(nimg, time.time()))

    def clear(self):
        if self.line is not None:
            self.line.clear()
