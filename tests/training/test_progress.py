"""Progress within a tick: the rate and the ETAs against hand-computed values."""

from training.progress import TickProgress


def test_tick_progress_rate_and_etas():
    progress = TickProgress(total_nimg=10000, tick_nimg=5000, interval=None)
    progress.start_tick(1000)
    progress.start_time = 100.0
    # 2000 images in 4 s: 0.5 kimg/s; the tick ends at 5000 images (the next multiple of 5 kimg, 4 s away),
    # training at 10000 (14 s away).
    assert progress.text(3000, 104.0) == 'kimg 3.000/10  0.500 kimg/s  next tick in 4s  end in 14s'
    progress.start_tick(9000)
    progress.start_time = 0.0
    assert progress.text(9500, 10.0) == 'kimg 9.500/10  0.050 kimg/s  next tick in 10s  end in 10s' # Capped at the end.
    assert progress.text(9000, 0.0).endswith('next tick in ?  end in ?') # No rate yet.
