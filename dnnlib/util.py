"""Miscellaneous utilities that do not depend on torch."""

import contextlib
import hashlib
import importlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse

#----------------------------------------------------------------------------

class EasyDict(dict):
    """A dict whose items can also be read and written as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

#----------------------------------------------------------------------------
# Construction of objects from a `class_name` string, as used by every *_kwargs dict.

def get_obj_by_name(name):
    """Return the object at the fully qualified `name`, e.g. 'training.networks.EOTGenerator'."""
    parts = name.split('.')
    # Try the longest importable module prefix first, then walk attributes.
    for i in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise # A genuine missing dependency inside the module.
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(f'"{name}": module "{module_name}" has no attribute "{".".join(parts[i:])}"') from None
        return obj
    raise ValueError(f'Cannot resolve "{name}": give a fully qualified name such as "package.module.Name"')


def call_func_by_name(*args, func_name=None, **kwargs):
    """Call the function named `func_name` with the given arguments and return its result."""
    assert func_name is not None, 'func_name is required'
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f'"{func_name}" is not callable')
    return func(*args, **kwargs)


def construct_class_by_name(*args, class_name=None, **kwargs):
    """Construct an instance of the class named `class_name` with the given arguments."""
    return call_func_by_name(*args, func_name=class_name, **kwargs)

#----------------------------------------------------------------------------
# Crash-safe writes.

@contextlib.contextmanager
def atomic_write(path, mode='wb', overwrite=True):
    """Open a temporary file beside `path` for writing; on success, fsync and rename it over `path`.

    A crash or exception at any point leaves `path` as it was (absent or the previous complete file)
    and removes the temporary file. With overwrite=False an existing `path` is never replaced: the
    file is linked into place, which fails with FileExistsError when the name exists (also when
    another process created it meanwhile). Yields the open file object.
    """
    assert mode in ('w', 'wb'), f'atomic_write supports modes "w" and "wb", not {mode!r}'
    path = os.fspath(path)
    dirname = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=dirname, prefix=temporary_prefix(path), suffix='.tmp')
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask) # mkstemp creates 0600 files; give the usual permissions.
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.remove(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    # Make the rename itself durable.
    with contextlib.suppress(OSError):
        dir_fd = os.open(dirname, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

def output_dir_problem(path):
    """Why a folder cannot be written at `path` (it is a file, lies under a file, or its nearest existing folder
    is not writable), as a phrase; None when it can be (made and) written into."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        return 'it is a file, not a folder'
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        return f'{existing} is a file, so no folder can be made under it'
    if not os.access(existing, os.W_OK | os.X_OK):
        return f'{existing} is not writable by this user' + ('' if existing == path else ', so the folder cannot be made')
    return None


def temporary_prefix(path):
    """The name prefix of temporaries written for `path`: '.<name>.<pid>-' (the pid tells whether the writer lives)."""
    return f'.{os.path.basename(os.path.normpath(os.fspath(path)))}.{os.getpid()}-'


_TEMPORARY = re.compile(r'\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+\.(?:tmp|old)')


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**22
    return True


def _last_change(path):
    """The newest modification time of a file, or of a folder and everything in it."""
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def remove_stale_temporaries(dirname, names=None, min_age_s=60.0):
    """Remove what interrupted atomic writes left in `dirname`: '.<name>.[<pid>-]<random>.tmp' files and folders
    (and '.<name>.<random>.old' folders), for the given file `names` or any. Returns the names removed.

    An entry is stale when its writer is not a running process on this machine (or its name, from an earlier
    version, carries no pid) and nothing in it changed for `min_age_s` seconds (a writer on another machine of a
    shared filesystem keeps changing it).
    """
    removed = []
    now = time.time()
    for entry in sorted(os.listdir(dirname)) if os.path.isdir(dirname) else []:
        m = _TEMPORARY.fullmatch(entry)
        if m is None or (names is not None and m.group('name') not in names):
            continue
        path = os.path.join(dirname, entry)
        try:
            if (m.group('pid') and _process_alive(int(m.group('pid')))) or now - _last_change(path) < min_age_s:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(entry)
        except OSError:
            continue # Gone meanwhile, or not ours to remove: leave it.
    return removed

#----------------------------------------------------------------------------
# Tee of stdout/stderr into a log file.

class Logger:
    """Redirect sys.stdout and sys.stderr so everything printed also goes to `file_name`.

    Use as a context manager or call close(). Lines are flushed to the file as they are written.
    """

    def __init__(self, file_name=None, file_mode='a', should_flush=True):
        self.file = open(file_name, file_mode, encoding='utf-8') if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, text):
        if isinstance(text, bytes):
            text = text.decode()
        if not text:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self):
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self):
        return False

    def close(self):
        self.flush()
        # Restore the streams only if they still point at us (nested loggers unwind in order).
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None

#----------------------------------------------------------------------------
# Opening local files and URLs, with an on-disk download cache.

CACHE_DIR_ENV = 'EOT_CACHE_DIR'

def make_cache_dir_path(*paths):
    """Return a path inside the download cache: $EOT_CACHE_DIR, else ~/.cache/eot-toolkit."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        root = os.path.join(os.path.expanduser('~'), '.cache', 'eot-toolkit')
    return os.path.join(root, *paths)


class DownloadError(RuntimeError):
    """A URL could not be fetched and no cached copy exists."""


def is_url(obj, allow_file_urls=True):
    """True if `obj` is an http(s):// URL (or a file:// URL when allowed)."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    scheme = urllib.parse.urlparse(obj).scheme
    return scheme in ('http', 'https') or (allow_file_urls and scheme == 'file')


def _file_url_to_path(url):
    parsed = urllib.parse.urlparse(url)
    path = urllib.parse.unquote(parsed.path)
    if os.name == 'nt' and re.match(r'^/[a-zA-Z]:', path):
        path = path[1:]
    return path


def open_url(url, cache=True, cache_dir=None, num_attempts=3, timeout=30, verbose=True, return_filename=False):
    """Open a local path, a file:// URL or an http(s):// URL and return a binary file object.

    http(s) downloads are stored in the cache (`cache_dir`, default `make_cache_dir_path('downloads')`)
    under a hash of the URL and reused afterwards. Failed downloads are retried `num_attempts` times.
    When the URL cannot be reached and no cached copy exists, raises DownloadError naming the URL and
    how to pass a local copy instead. With `return_filename=True`, returns the local path.
    """
    url = os.fspath(url)
    if not is_url(url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'No such file: "{url}"')
        return url if return_filename else open(url, 'rb')
    if urllib.parse.urlparse(url).scheme == 'file':
        path = _file_url_to_path(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'No such file: "{path}" (from URL "{url}")')
        return path if return_filename else open(path, 'rb')

    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    url_name = re.sub(r'[^0-9a-zA-Z._-]', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'download'
    cache_path = os.path.join(cache_dir, f'{url_md5}_{url_name}')
    if cache and os.path.isfile(cache_path):
        return cache_path if return_filename else open(cache_path, 'rb')

    import requests # Imported lazily: only downloads need it.
    data = None
    last_err = None
    for attempt in range(num_attempts):
        try:
            if verbose:
                print(f'Downloading {url} ...', file=sys.stderr, flush=True)
            with requests.get(url, timeout=timeout) as res:
                res.raise_for_status()
                data = res.content
            break
        except (requests.RequestException, OSError) as err:
            last_err = err
            if attempt + 1 < num_attempts:
                time.sleep(min(2 ** attempt, 4))
    if data is None:
        raise DownloadError(
            f'Could not download "{url}" after {num_attempts} attempts ({type(last_err).__name__}: {last_err}), '
            f'and there is no cached copy in "{cache_dir}". If this machine is offline, download the file '
            f'elsewhere and pass its local path instead of the URL (or place it at "{cache_path}").')

    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_write(cache_path, 'wb') as f:
            f.write(data)
        return cache_path if return_filename else open(cache_path, 'rb')
    if return_filename:
        raise ValueError('return_filename=True needs cache=True for URLs')
    return io.BytesIO(data)

#----------------------------------------------------------------------------
# Formatting helpers used by progress output.

def format_time(seconds):
    """Format seconds as a short human-readable string, e.g. '1h 02m 03s'."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 3600:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // (24 * 3600)}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'


class ProgressLine:
    """Progress of long work on one line.

    On a terminal the line is rewritten in place, at most every `tty_interval` seconds, and only on the
    terminal (a Logger's log file never sees it). Elsewhere (a pipe, a file) a plain line is printed through
    `stream` every `interval` seconds (none when `interval` is None). So quick work shows nothing: the
    terminal line appears after `delay` seconds, the first plain line after `interval`. `update(..., force=True)`
    shows the line at once.
    """

    def __init__(self, interval=30.0, tty_interval=0.25, delay=1.0, stream=None):
        self.stream = sys.stdout if stream is None else stream
        terminal = self.stream
        while isinstance(terminal, Logger): # A Logger's isatty() is False; its terminal may not be.
            terminal = terminal.stdout
        self.tty = terminal if getattr(terminal, 'isatty', lambda: False)() else None
        self.interval, self.tty_interval = interval, tty_interval
        self.last = time.monotonic() + (delay - tty_interval if self.tty is not None else 0)
        self.width = 0

    def update(self, text, force=False):
        """Show `text` if its interval has passed (or `force`)."""
        now = time.monotonic()
        if self.tty is not None:
            if force or now - self.last >= self.tty_interval:
                self.tty.write('\r' + text + ' ' * max(self.width - len(text), 0))
                self.tty.flush()
                self.width, self.last = len(text), now
        elif self.interval is not None and (force or now - self.last >= self.interval):
            print(text, file=self.stream, flush=True)
            self.last = now

    def clear(self):
        """Erase the terminal line (call before printing anything else)."""
        if self.tty is not None and self.width:
            self.tty.write('\r' + ' ' * self.width + '\r')
            self.tty.flush()
            self.width = 0

    def close(self):
        """End the terminal line, keeping its last text."""
        if self.tty is not None and self.width:
            self.tty.write('\n')
            self.tty.flush()
            self.width = 0
