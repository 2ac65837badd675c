"""Unix domain sockets for the plaintext legs of the local sidecar mesh (`meshctl up`, `meshctl demo`).

On Kubernetes and Compose each app and its sidecar share a pod's private loopback; on one machine every
service shares the host's, so a plaintext TCP port there is open to every local process: anyone could
call auth-svc's app directly, or call peers through a sidecar's outbound listener with that sidecar's
mTLS identity. The local mesh therefore puts both plaintext legs on Unix domain sockets, which the
kernel guards with file permissions::

    <folder>/                0700, owned by the mesh's user, checked (not a symlink, not another user's)
        <svc>.app.sock       0600: the app's gRPC listener; its sidecar's `local_app` cluster dials it
        <svc>.out.sock       0600: the sidecar's outbound listener; the app dials it (unix:<path>)

The folder is ``<state>/run`` when every socket path fits in ``sun_path`` (107 bytes and a NUL on
Linux). A deeper state directory uses ``$XDG_RUNTIME_DIR/aivo-mesh-<hash>`` (a per-user 0700 folder)
or else ``<tmp>/aivo-mesh-<uid>-<hash>``, the hash being of the state directory's absolute path: `up`,
its supervisor and `demo` derive the same folder without being told, and runtime.json names it
(`RuntimeInfo.sockets`) for `meshctl down`. The servers bind inside the already-0700 folder and then
narrow the socket to 0600 (Envoy's `pipe.mode`, a chmod after grpc's bind), so no other user can open a
socket even for the instant between bind and chmod.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import stat
import sys
import tempfile
from pathlib import Path

from aivo_mesh.errors import MeshError

__all__ = ["DIR_MODE", "SOCKET_MODE", "SUN_PATH_MAX", "app_socket", "ensure_private_dir", "outbound_socket",
           "remove_socket_dir", "socket_dir", "unix_listen_problem"]

DIR_MODE = 0o700
SOCKET_MODE = 0o600
# sockaddr_un.sun_path: 108 bytes on Linux, 104 on the BSDs and macOS, one of them the terminating NUL.
SUN_PATH_MAX = 107 if sys.platform.startswith("linux") else 103
APP_SUFFIX = ".app.sock"
OUTBOUND_SUFFIX = ".out.sock"


def app_socket(folder: Path, service: str) -> Path:
    """Where `service`'s app listens (plaintext gRPC, behind its sidecar)."""
    return folder / f"{service}{APP_SUFFIX}"


def outbound_socket(folder: Path, service: str) -> Path:
    """Where `service`'s sidecar takes the app's outbound calls."""
    return folder / f"{service}{OUTBOUND_SUFFIX}"


def _fits(folder: Path, services: list[str]) -> bool:
    longest = max((len(os.fsencode(outbound_socket(folder, s))) for s in services), default=0)
    return longest <= SUN_PATH_MAX


def socket_dir(state_root: Path, services: list[str]) -> Path:
    """The private socket folder of the local mesh run from `state_root`, created (0700) and checked."""
    root = state_root.resolve()
    folder = root / "run"
    if not _fits(folder, services):
        digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:12]
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
            folder = Path(runtime) / f"aivo-mesh-{digest}"
        else:
            folder = Path(tempfile.gettempdir()) / f"aivo-mesh-{os.getuid()}-{digest}"
        if not _fits(folder, services):
            longest = max(services, key=len)
            raise MeshError(f"socket path {outbound_socket(folder, longest)} is longer than a Unix socket "
                            f"allows ({SUN_PATH_MAX} bytes): use shorter service names or set XDG_RUNTIME_DIR "
                            "to a short per-user folder")
    ensure_private_dir(folder)
    return folder


def ensure_private_dir(folder: Path) -> None:
    """Create `folder` 0700, or accept an existing one only if it is a real directory owned by us (then
    0700 again). Anything else (a symlink, another user's folder: someone who could swap our sockets)
    is refused rather than used."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=DIR_MODE)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise MeshError(f"{folder} is not a directory (a symlink or file is in the way of the mesh's socket "
                        "folder): remove it")
    if st.st_uid != os.getuid():
        raise MeshError(f"socket folder {folder} belongs to uid {st.st_uid}, not to this user ({os.getuid()}): "
                        "another user could replace the mesh's sockets; remove it")
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(folder, DIR_MODE)


def remove_socket_dir(folder: Path) -> None:
    """Remove the sockets left in `folder` (grpc removes its own on stop, Envoy leaves its), then the
    folder if nothing else is in it."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for p in folder.iterdir():
            if p.name.endswith((APP_SUFFIX, OUTBOUND_SUFFIX)) and stat.S_ISSOCK(os.lstat(p).st_mode):
                p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()


def unix_listen_problem(path: str | Path, what: str) -> str | None:
    """Why a server could not listen on the Unix socket `path` now (one line naming it and `what`
    uses it), or None. A socket nobody answers on is a leftover of a crashed process and counts as free
    (the servers replace it); one that answers is in use: binding over it would silently take it."""
    p = Path(path)
    if len(os.fsencode(p)) > SUN_PATH_MAX:
        return f"cannot listen on unix:{p} ({what}): the path is longer than {SUN_PATH_MAX} bytes"
    if not p.parent.is_dir():
        return f"cannot listen on unix:{p} ({what}): {p.parent} is not a directory"
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return f"cannot listen on unix:{p} ({what}): a file that is not a socket is in the way"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(p))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return None
            return f"cannot listen on unix:{p} ({what}): {exc.strerror}"
    return f"unix:{p} in use: {what} cannot listen there (another process has it)"
