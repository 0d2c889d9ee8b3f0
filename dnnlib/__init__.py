"""Small, dependency-light utilities shared by every script: EasyDict, class construction by name,
URL/file opening with a download cache, atomic file writes and a stdout/stderr tee."""

from .util import EasyDict, Logger, atomic_write, call_func_by_name, construct_class_by_name, open_url  # noqa: F401
