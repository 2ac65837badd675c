"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

The data goes to a temporary file in the target's directory (same filesystem, so the rename is
atomic), created with at most 0600 under umask 077 so a key is never readable by anyone else even
for an instant, chmod'ed to the final mode and then ``os.replace``d over the target.

One helper for every file something else may read while it is rewritten: certificates and keys
(pki/store.py, which turns OSError into PkiError), and the files `meshctl` reads from a running
local mesh (runtime.json, restarts.json, the process registry, the collector's stats) or renders.
It lives here, not in pki/, because the runtime and the collector have no business importing the
PKI layer or its errors. `fsync=True` also makes the write survive a crash (the PKI's files);
state that describes running processes is meaningless after one, so it skips the cost.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

_umask_lock = threading.Lock()


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Run the body under umask 077 (process-wide, so serialised; stricter for any racing thread)."""
    with _umask_lock:
        old = os.umask(0o077)
        try:
            yield
        finally:
            os.umask(old)


def stage(path: Path, data: bytes, mode: int, *, fsync: bool = False) -> Path:
    """Write `data` to a fresh temporary file next to `path` (mode exactly `mode`); returns its path.
    Raises OSError, leaving no temporary file behind."""
    import secrets  # here: `meshctl` starts without it

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with private_umask():
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(tmp, flags, mode & 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fchmod(fd, mode)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644, *, fsync: bool = False) -> None:
    """Replace `path` by `data` (str is written as UTF-8) atomically, permissions exactly `mode`.
    Raises OSError."""
    tmp = stage(path, data.encode() if isinstance(data, str) else data, mode, fsync=fsync)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    # Makes a rename durable; best effort (not supported on every platform/filesystem).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
