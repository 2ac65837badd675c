"""File I/O of the PKI: atomic writes with exact permissions, and reads that raise PkiError.

Writes go to a temporary file in the target's directory (same filesystem), are fsynced, chmod'ed to
the final mode and then ``os.replace``d over the target, so a reader sees either the old or the new
file, never a partial one. Files are created with ``os.open(..., mode)`` under umask 077, so a key
is never readable by anyone else, even for an instant.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from aivo_mesh.errors import PkiError

KEY_MODE = 0o600
CERT_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
PUBLIC_DIR_MODE = 0o755

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


def ensure_dir(path: Path, mode: int) -> None:
    """Create `path` (and parents) if missing; set `mode` on it."""
    with private_umask():
        path.mkdir(parents=True, exist_ok=True)
    try:
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
    except OSError as exc:
        raise PkiError(str(path), f"cannot set directory permissions: {exc.strerror or exc}") from None


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` atomically with permissions exactly `mode`."""
    tmp = _stage(path, data, mode)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PkiError(str(path), f"cannot write: {exc.strerror or exc}") from None
    _fsync_dir(path.parent)


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a fresh temporary file next to `path` (mode exactly `mode`, fsynced)."""
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
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PkiError(str(path), f"cannot write: {exc.strerror or exc}") from None
    return tmp


def write_pair_atomic(cert_path: Path, cert: bytes, key_path: Path, key: bytes) -> None:
    """Replace a certificate and its key with the shortest possible window between the two renames.

    Both files are fully written and fsynced first; then the key and the certificate are renamed
    back to back. A reader that still catches the (tiny) window sees a key/cert mismatch, which
    `load_identity` reports as PkiError, so it keeps its previous credentials and retries later.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        staged.append((_stage(key_path, key, KEY_MODE), key_path))
        staged.append((_stage(cert_path, cert, CERT_MODE), cert_path))
        for tmp, final in staged:
            try:
                os.replace(tmp, final)
            except OSError as exc:
                raise PkiError(str(final), f"cannot write: {exc.strerror or exc}") from None
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
    _fsync_dir(cert_path.parent)
    if key_path.parent != cert_path.parent:
        _fsync_dir(key_path.parent)


def write_key(path: Path, pem: bytes) -> None:
    write_atomic(path, pem, KEY_MODE)


def write_cert(path: Path, pem: bytes) -> None:
    write_atomic(path, pem, CERT_MODE)


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; best effort (not supported on every platform/filesystem).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(path: Path, what: str = "file") -> bytes:
    """Read a PKI file; any OSError becomes PkiError naming the file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(str(path), f"{what} not found") from None
    except IsADirectoryError:
        raise PkiError(str(path), f"{what} is a directory") from None
    except OSError as exc:
        raise PkiError(str(path), f"cannot read {what}: {exc.strerror or exc}") from None


def key_permission_problem(path: Path) -> str | None:
    """Why a private key file is unsafe (group/other bits set, not a regular file), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "private key not found"
    except OSError as exc:
        return f"cannot stat private key: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return "private key is not a regular file"
    if st.st_mode & 0o077:
        return (
            f"private key is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    return None
