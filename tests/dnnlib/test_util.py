"""Tests for dnnlib.util: EasyDict, construction by name, open_url, atomic_write, Logger."""

import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import dnnlib
from dnnlib import util


def test_easydict_attribute_access():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing


def test_construct_and_call_by_name():
    od = util.construct_class_by_name([('x', 1)], class_name='collections.OrderedDict')
    assert type(od).__name__ == 'OrderedDict' and od['x'] == 1
    assert util.call_func_by_name(4.0, func_name='math.sqrt') == 2.0
    assert util.construct_class_by_name(class_name='dnnlib.EasyDict', a=3).a == 3
    with pytest.raises(ValueError, match='no attribute'):
        util.call_func_by_name(func_name='math.no_such_function')
    with pytest.raises(ValueError, match='fully qualified'):
        util.call_func_by_name(func_name='no_such_module_xyz.f')


def test_open_url_local_and_file_url(tmp_path):
    p = tmp_path / 'a b.bin'
    p.write_bytes(b'hello')
    with util.open_url(str(p)) as f:
        assert f.read() == b'hello'
    with util.open_url(p.as_uri()) as f:
        assert f.read() == b'hello'
    with pytest.raises(FileNotFoundError, match='missing.bin'):
        util.open_url(str(tmp_path / 'missing.bin'))


class _Handler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self): # noqa: N802 (http.server API)
        type(self).hits += 1
        body = b'payload:' + self.path.encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_open_url_http_cache_and_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv(util.CACHE_DIR_ENV, str(tmp_path / 'cache'))
    server = http.server.HTTPServer(('127.0.0.1', 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f'http://127.0.0.1:{server.server_address[1]}/weights.pkl'
    try:
        with util.open_url(url, verbose=False) as f:
            assert f.read() == b'payload:/weights.pkl'
        with util.open_url(url, verbose=False) as f: # Served from the cache.
            assert f.read() == b'payload:/weights.pkl'
        assert _Handler.hits == 1
        assert os.path.isdir(tmp_path / 'cache' / 'downloads')
    finally:
        server.shutdown()
        server.server_close()
    # The cached copy keeps working with the server gone.
    with util.open_url(url, verbose=False) as f:
        assert f.read() == b'payload:/weights.pkl'

    # A port with nothing listening: retried, then a clear error naming the URL and the fix.
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    dead = f'http://127.0.0.1:{port}/detector.pkl'
    with pytest.raises(util.DownloadError) as info:
        util.open_url(dead, num_attempts=2, timeout=2, verbose=False)
    msg = str(info.value)
    assert dead in msg and 'local path' in msg and '2 attempts' in msg


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path / 'state.bin'
    with util.atomic_write(p) as f:
        f.write(b'first')
    with pytest.raises(RuntimeError):
        with util.atomic_write(p) as f:
            f.write(b'second, partial')
            raise RuntimeError('crash mid-write')
    assert p.read_bytes() == b'first'
    assert sorted(os.listdir(tmp_path)) == ['state.bin'] # No temporary left behind.


def test_atomic_write_survives_sigkill(tmp_path):
    p = tmp_path / 'state.bin'
    p.write_bytes(b'previous')
    code = ('import os, signal, sys; from dnnlib.util import atomic_write\n'
            'with atomic_write(sys.argv[1]) as f:\n'
            '    f.write(b"x" * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n')
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, '-c', code, str(p)], cwd=repo, capture_output=True)
    assert res.returncode != 0
    assert p.read_bytes() == b'previous'


def test_logger_tees_stdout_and_stderr(tmp_path, capsys):
    log = tmp_path / 'log.txt'
    with util.Logger(str(log), file_mode='w'):
        print('to stdout')
        print('to stderr', file=sys.stderr)
    print('after close')
    text = log.read_text()
    assert 'to stdout' in text and 'to stderr' in text and 'after close' not in text
    assert 'to stdout' in capsys.readouterr().out


def test_format_time():
    assert util.format_time(5) == '5s'
    assert util.format_time(65) == '1m 05s'
    assert util.format_time(3725) == '1h 02m 05s'


def test_atomic_write_gives_default_permissions(tmp_path):
    p = tmp_path / 'x.bin'
    with util.atomic_write(p) as f:
        f.write(b'1')
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(p).st_mode & 0o777) == (0o666 & ~umask)


def test_atomic_write_without_overwrite_never_replaces_a_file(tmp_path):
    p = tmp_path / 'snapshot.pkl'
    with util.atomic_write(p, overwrite=False) as f:
        f.write(b'first')
    with pytest.raises(FileExistsError):
        with util.atomic_write(p, overwrite=False) as f:
            f.write(b'second')
    assert p.read_bytes() == b'first' and sorted(os.listdir(tmp_path)) == ['snapshot.pkl']


def test_remove_stale_temporaries_keeps_live_and_recent_writes(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    old = time.time() - 3600
    entries = {
        f'.state.pt.{dead_pid}-abc_12.tmp': True,        # writer gone, untouched for an hour: stale
        '.state.pt.k3j9x2ab.tmp': True,                  # an earlier version's name (no pid): stale when old
        f'.state.pt.{os.getpid()}-zz.tmp': False,        # its writer is alive
        f'.y.{dead_pid}-dir.tmp': True,                  # an interrupted folder write
        '.y.q1w2e3.old': True,                           # a folder left mid-swap
        'state.pt': False, '.lock': False, 'notes.tmp': False,
    }
    for name in entries:
        if name.startswith('.y.'):
            (tmp_path / name / 'sub').mkdir(parents=True)
            (tmp_path / name / 'sub' / 'f.png').write_bytes(b'x')
            for p in (tmp_path / name / 'sub' / 'f.png', tmp_path / name / 'sub', tmp_path / name):
                os.utime(p, (old, old))
        else:
            (tmp_path / name).write_bytes(b'x')
            os.utime(tmp_path / name, (old, old))
    recent = tmp_path / '.state.pt.m4n5b6.tmp'   # no pid, but written a moment ago: maybe another machine's
    recent.write_bytes(b'x')
    assert util.remove_stale_temporaries(str(tmp_path), names=['y']) == sorted(n for n in entries if n.startswith('.y.'))
    removed = util.remove_stale_temporaries(str(tmp_path))
    assert removed == sorted(n for n, stale in entries.items() if stale and not n.startswith('.y.'))
    assert sorted(os.listdir(tmp_path)) == sorted([recent.name] + [n for n, stale in entries.items() if not stale])
    assert util.remove_stale_temporaries(str(tmp_path), min_age_s=0) == [recent.name]


def test_atomic_write_temporaries_carry_the_writers_pid(tmp_path):
    with util.atomic_write(tmp_path / 'x.bin') as f:
        names = os.listdir(tmp_path)
        f.write(b'1')
    assert len(names) == 1 and names[0].startswith(f'.x.bin.{os.getpid()}-') and names[0].endswith('.tmp')


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_plain_lines_at_intervals(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(util.time, 'monotonic', lambda: clock[0])
    out = io.StringIO()
    line = util.ProgressLine(interval=30, stream=out)
    line.update('a')                   # Quick work shows nothing ...
    clock[0] += 29
    line.update('b')
    assert out.getvalue() == ''
    clock[0] += 1                      # ... a plain line every `interval` seconds.
    line.update('c')
    line.update('d')
    line.update('e', force=True)
    line.clear()
    line.close()
    assert out.getvalue() == 'c\ne\n'
    silent = io.StringIO()
    util.ProgressLine(interval=None, stream=silent).update('x', force=True)
    assert silent.getvalue() == ''


def test_progress_line_rewrites_one_terminal_line_and_keeps_it_out_of_the_log(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(util.time, 'monotonic', lambda: clock[0])
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stdout', terminal)
    logger = util.Logger(str(tmp_path / 'log.txt'))
    try:
        line = util.ProgressLine(tty_interval=0.25, delay=1.0) # On sys.stdout: the Logger, a terminal behind it.
        line.update('10%')
        clock[0] = 1.0
        line.update('20% long')
        clock[0] = 1.1
        line.update('30%')                # Within tty_interval: skipped.
        clock[0] = 1.5
        line.update('40%')
        line.clear()
        print('tick')
        line.update('50%', force=True)
        line.close()
    finally:
        logger.close()
    assert terminal.getvalue() == '\r20% long\r40%     \r   \rtick\n\r50%\n'
    assert (tmp_path / 'log.txt').read_text() == 'tick\n'
