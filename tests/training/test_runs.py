"""Run directories: atomic claims, locks, the newest state."""

import os
import subprocess
import sys
import threading

import pytest

from training import runs


def test_simultaneous_claims_get_distinct_directories_even_from_a_stale_listing(tmp_path, monkeypatch):
    """Every claimant lists the folder before any of them creates its directory (what two jobs of an array
    started together see, and what a network filesystem's cached listing shows): all must still differ."""
    (tmp_path / '00003-old').mkdir()
    stale = os.listdir(tmp_path)
    monkeypatch.setattr(runs.os, 'listdir', lambda path: list(stale))
    claimed, start = [], threading.Barrier(8)

    def claim():
        start.wait()
        claimed.append(runs.claim_run_dir(str(tmp_path), 'run-eot'))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == [str(tmp_path / f'{i:05d}-run-eot') for i in range(4, 12)]
    assert all(os.path.isdir(p) for p in claimed)


def test_next_run_dir_follows_the_largest_number(tmp_path):
    assert runs.next_run_dir(str(tmp_path / 'none'), 'x') == str(tmp_path / 'none' / '00000-x')
    for name in ('00002-a', '00010-b', 'notes', '7', '00004-c'):
        (tmp_path / name).mkdir()
    assert runs.next_run_dir(str(tmp_path), 'x') == str(tmp_path / '00011-x')


def test_a_run_directory_is_locked_while_a_process_holds_it(tmp_path):
    lock = runs.RunLock(str(tmp_path))
    with pytest.raises(runs.RunDirError, match=f'in use by another run \\(pid {os.getpid()} on '):
        runs.RunLock(str(tmp_path))
    lock.release()
    runs.RunLock(str(tmp_path)).release()
    # A process that dies while holding the lock leaves none behind.
    code = f'import sys; sys.path.insert(0, {os.getcwd()!r}); from training import runs; runs.RunLock({str(tmp_path)!r}); ' \
           'print("locked", flush=True); sys.stdin.read()'
    child = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == 'locked'
        with pytest.raises(runs.RunDirError, match=f'pid {child.pid} '):
            runs.RunLock(str(tmp_path))
    finally:
        child.kill()
        child.wait()
    runs.RunLock(str(tmp_path)).release()
