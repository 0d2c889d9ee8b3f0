"""Run directories: claiming a new one, finding the states in one, and holding one while a run writes into it.

A run directory is `<outdir>/NNNNN-<desc>`. Two runs started at the same moment into one --outdir must get
two directories: a directory is claimed by creating it (`os.mkdir` either creates it or fails, atomically,
also on network filesystems), never by listing the folder and then creating what the listing said was free.
A run that continues in an existing directory holds an exclusive lock on it, so a second run cannot write
into the same directory while the first is alive; the lock goes with the process, however it ends.
"""

import glob
import os
import re
import socket

try:
    import fcntl
except ImportError:  # Not on POSIX: no locking (the directory claim itself stays atomic).
    fcntl = None

#----------------------------------------------------------------------------

class RunDirError(RuntimeError):
    """A run directory cannot be claimed or is in use; the message says why and what to do."""


# Files of a run named by progress: network-snapshot-<tag>.pkl, training-state-<tag>.pt, fakes-<tag>.png.
# The tag is the image count, 10 digits (unique within a run, however short a tick); files written before
# this version carry the floor of the kimg count in 6 digits (a kimg count would need 10 digits only after
# 10^12 images), so the number of digits tells the two apart.
PROGRESS_FILE = re.compile(r'(network-snapshot|training-state|fakes)-(\d+)\.(pkl|pt|png)')


def progress_tag(nimg):
    """The tag of the files written at `nimg` images."""
    return f'{int(nimg):010d}'


def file_nimg(name):
    """The image count in a progress file's name (the lower bound for kimg-named files), or None."""
    m = PROGRESS_FILE.fullmatch(os.path.basename(name))
    if m is None:
        return None
    digits = m.group(2)
    return int(digits) if len(digits) >= 10 else int(digits) * 1000


def find_latest_state(run_dir):
    """Path of the newest complete training-state-*.pt in `run_dir` (image- or kimg-named), or None."""
    states = [s for s in glob.glob(os.path.join(run_dir, 'training-state-*.pt')) if file_nimg(s) is not None]
    return max(states, key=lambda s: (file_nimg(s), len(os.path.basename(s))), default=None)


def set_aside_later_files(run_dir, nimg):
    """Move the progress files of `run_dir` written after `nimg` images into superseded-<tag>/; their names.

    A run continued from a state repeats the training after it and writes files of the same names; those
    of the earlier attempt (written after its last state, before it stopped) are kept there, never replaced.
    """
    later = sorted(n for n in os.listdir(run_dir) if (k := file_nimg(n)) is not None and k > nimg)
    if later:
        dest = os.path.join(run_dir, f'superseded-{progress_tag(nimg)}')
        for k in range(2, 10000):
            try:
                os.mkdir(dest)
                break
            except FileExistsError: # Continued from the same state before: a new folder, nothing replaced.
                dest = os.path.join(run_dir, f'superseded-{progress_tag(nimg)}-{k}')
        for name in later:
            os.replace(os.path.join(run_dir, name), os.path.join(dest, name))
    return later


def run_ids(outdir):
    """{run directory name: its number} of the NNNNN-* entries of `outdir`."""
    names = os.listdir(outdir) if os.path.isdir(outdir) else []
    return {n: int(m.group()) for n in names if (m := re.match(r'^\d+(?=-)', n)) is not None}


def next_run_dir(outdir, desc):
    """The directory a new run would get now (for --dry-run; a real run calls claim_run_dir)."""
    return os.path.join(outdir, f'{max(run_ids(outdir).values(), default=-1) + 1:05d}-{desc}')


def claim_run_dir(outdir, desc, attempts=1000):
    """Create and return a new `<outdir>/NNNNN-<desc>` directory that no other run has.

    The number starts after the largest in `outdir`; when another run creates that name first (the
    mkdir fails), the next number is tried, without relying on a fresh listing (which a network
    filesystem may serve from a cache).
    """
    os.makedirs(outdir, exist_ok=True)
    run_id = max(run_ids(outdir).values(), default=-1) + 1
    for _ in range(attempts):
        path = os.path.join(outdir, f'{run_id:05d}-{desc}')
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            run_id += 1
    raise RunDirError(f'--outdir={outdir}: no free run number after {attempts} attempts; choose another --outdir')


class RunLock:
    """An exclusive lock on a run directory while this process writes into it (a `.lock` file, flock).

    Raises RunDirError when another live process holds it. Released by `release()` or when the process
    ends, however it ends (a killed run leaves no stale lock behind). Where the filesystem has no
    locks, a warning is printed and the run goes on unlocked.
    """

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, '.lock')
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode(errors='replace').strip() or 'unknown process'
            os.close(self.fd)
            self.fd = None
            raise RunDirError(f'{run_dir} is in use by another run ({holder}); wait for it to end, or start a new '
                              'run (another --outdir or --name, or leave out --resume=auto / --nosubdir)') from None
        except OSError as err:
            print(f'Warning: cannot lock {run_dir} ({err.strerror}); make sure no other run writes into it')
            return
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode())

    def release(self):
        if self.fd is not None:
            os.close(self.fd) # Closing the descriptor releases the flock.
            self.fd = None
