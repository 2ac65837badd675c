"""File I/O of the PKI: atomic, durable writes with exact permissions, and reads that raise PkiError.

Writes are fsutil's (a temporary file next to the target, fsynced, chmod'ed to the final mode and
``os.replace``d over it), so a reader sees either the old or the new file, never a partial one, and
a key is never readable by anyone else, even for an instant. Here an OSError becomes PkiError.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from aivo_mesh import fsutil
from aivo_mesh.errors import PkiError
from aivo_mesh.fsutil import private_umask

KEY_MODE = 0o600
CERT_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
PUBLIC_DIR_MODE = 0o755

@contextlib.contextmanager
def _as_pki_error(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise PkiError(str(path), f"cannot write: {exc.strerror or exc}") from None


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
    """Write `data` to `path` atomically and durably with permissions exactly `mode`."""
    with _as_pki_error(path):
        fsutil.write_atomic(path, data, mode, fsync=True)


def write_pair_atomic(cert_path: Path, cert: bytes, key_path: Path, key: bytes) -> None:
    """Replace a certificate and its key with the shortest possible window between the two renames.

    Both files are fully written and fsynced first; then the key and the certificate are renamed
    back to back. A reader that still catches the (tiny) window sees a key/cert mismatch, which
    `load_identity` reports as PkiError, so it keeps its previous credentials and retries later.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for final, data, mode in ((key_path, key, KEY_MODE), (cert_path, cert, CERT_MODE)):
            with _as_pki_error(final):
                staged.append((fsutil.stage(final, data, mode, fsync=True), final))
        for tmp, final in staged:
            with _as_pki_error(final):
                os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
    fsutil.fsync_dir(cert_path.parent)
    if key_path.parent != cert_path.parent:
        fsutil.fsync_dir(key_path.parent)


def write_key(path: Path, pem: bytes) -> None:
    write_atomic(path, pem, KEY_MODE)


def write_cert(path: Path, pem: bytes) -> None:
    write_atomic(path, pem, CERT_MODE)


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
