"""TLS 1.3 only, enforced by grpc core itself, for every mesh channel and server of the process.

grpcio has no TLS-version option in Python (grpc#37305). BoringSSL always offers its TLS 1.3 cipher
suites and takes the TLS 1.2 ones from `GRPC_SSL_CIPHER_SUITES`. A list holding only a PSK suite, which
needs a pre-shared key that no peer has, leaves TLS 1.2 nothing to negotiate: a TLS 1.2-only peer fails
the handshake, whichever side it is on, before any request or response is sent. That is how MeshClient
refuses a TLS 1.2 server (it cannot see the negotiated version afterwards); MeshServer also refuses a
TLS 1.2 connection per call (server/interceptors.py), should the variable not have applied.

grpc reads the variable once, when grpc is first imported, so `aivo_mesh/__init__.py` calls `configure()`
before anything imports grpc. Importing grpc before aivo_mesh, or setting the variable to another list,
leaves TLS 1.2 possible: MeshClient and MeshServer then log a warning naming the cause.
"""

from __future__ import annotations

import os
import sys

CIPHER_SUITES_VAR = "GRPC_SSL_CIPHER_SUITES"
# A TLS 1.2 suite no mesh peer can use (PSK): TLS 1.3's suites are not configurable and stay offered.
TLS13_ONLY = "ECDHE-PSK-CHACHA20-POLY1305"

_state: dict[str, bool] = {}


def configure() -> None:
    """Set the variable unless the user set it, and remember whether grpc was already loaded."""
    if _state:
        return
    _state["grpc_loaded_first"] = "grpc" in sys.modules or "grpc._cython.cygrpc" in sys.modules
    os.environ.setdefault(CIPHER_SUITES_VAR, TLS13_ONLY)
    _state["ours"] = os.environ[CIPHER_SUITES_VAR] == TLS13_ONLY


def tls13_enforced() -> bool:
    """Whether grpc core refuses TLS 1.2 peers in this process."""
    configure()
    return _state["ours"] and not _state["grpc_loaded_first"]


def why_not_enforced() -> str | None:
    """Why TLS 1.2 peers are possible in this process (for a warning), or None."""
    configure()
    if _state["grpc_loaded_first"]:
        return ("grpc was imported before aivo_mesh, so grpc core did not see "
                f"{CIPHER_SUITES_VAR}={TLS13_ONLY}: import aivo_mesh first, or export the variable")
    if not _state["ours"]:
        return (f"{CIPHER_SUITES_VAR} is set to {os.environ.get(CIPHER_SUITES_VAR)!r}, which allows TLS 1.2; "
                f"unset it or set it to {TLS13_ONLY}")
    return None


_warned: set[str] = set()


def warn_if_not_enforced(what: str) -> None:
    """One warning per process and component when TLS 1.2 peers are possible."""
    reason = why_not_enforced()
    if reason is not None and what not in _warned:
        import logging  # here: importing aivo_mesh (`meshctl` starting) does not load it

        _warned.add(what)
        logging.getLogger(__name__).warning("%s: TLS 1.2 peers are not refused at the handshake: %s", what, reason)
