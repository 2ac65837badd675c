"""mTLS server credentials that follow the certificate files (rotation without restart).

grpc calls the fetcher on every new connection before the handshake, so it must be cheap and
must never raise: we compare file stat signatures and re-read only on change. A rotated file
that fails to load keeps the last good identity and is reported through `on_error`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from aivo_mesh.errors import PkiError
from aivo_mesh.pki import Identity, load_identity
from aivo_mesh.pki.load import FileSignature
from aivo_mesh.pki.peer import Role

log = logging.getLogger(__name__)

SERVER_ROLE: tuple[Role, ...] = ("server",)  # the certificate this server presents must be fit to be one (serverAuth)


class ReloadingServerCredentials:
    def __init__(
        self,
        cert: Path,
        key: Path,
        ca: Path,
        on_reload: Callable[[Identity], None] | None = None,
        expect_spiffe_id: str | None = None,
    ) -> None:
        self._paths = (Path(cert), Path(key), Path(ca))
        self._expect = expect_spiffe_id
        # Load eagerly: a bad file must fail before the server binds, naming the file.
        self.identity = load_identity(*self._paths, expect_spiffe_id=expect_spiffe_id, roles=SERVER_ROLE)
        self._signature = self.identity.mtime_signature()
        self._rejected: tuple[FileSignature, ...] | None = None  # files that failed to load, as they were
        self._on_reload = on_reload
        self.reloads = 0

    def _config(self, ident: Identity) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(ident.key_pem, ident.cert_chain_pem)], root_certificates=ident.ca_pem)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(self.identity), self._fetch, require_client_authentication=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        signature = None
        try:
            signature = Identity.signature_of(*self._paths)
            if signature == self._signature or signature == self._rejected:
                return None
            ident = load_identity(*self._paths, expect_spiffe_id=self._expect, roles=SERVER_ROLE)
        except (PkiError, OSError) as exc:
            # Half-written rotation or a bad file: keep serving the last good identity. grpc asks on
            # every handshake: the same bad files are not parsed (nor logged) again until they change.
            self._rejected = signature
            log.warning("certificate reload skipped: %s", exc)
            return None
        except Exception:  # never raise into grpc's handshake path
            log.exception("certificate reload failed")
            return None
        self.identity = ident
        self._signature = ident.mtime_signature()
        self.reloads += 1
        if self._on_reload is not None:
            self._on_reload(ident)
        log.info("certificate reloaded", extra={"serial": f"{ident.serial:x}"})
        return self._config(ident)
