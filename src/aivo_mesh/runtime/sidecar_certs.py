"""What the local mesh's Envoys may present and accept: only certificates the peer policy vetted.

Envoy reads certificate files as they are and serves whatever it finds (an expired or CA:TRUE file
swapped in would be served to every caller), and its validator cannot check key sizes, signature hashes,
CA:TRUE leaves, second URI SANs or revocation by key. So on the local mesh (`meshctl up`, `meshctl demo`)
no Envoy reads the certs directory itself. For each sidecar this module writes, under
`<state>/envoy/<svc>/`:

    vetted/<svc>.crt, vetted/<svc>-key.pem   the service's certificate and key, copied only after
                                             `load_identity` and the peer policy passed them, as the
                                             proxyless server checks a rotation before using it
    vetted/ca.crt                            the trust bundle, likewise
    sds/tls_cert.yaml, sds/mesh_ca.yaml      the SDS files pointing at them; mesh_ca.yaml also lists
                                             `verify_certificate_spki`: the keys of every identity's
                                             current vetted certificate and of the one before it (a
                                             rotation in progress), minus revoked ones

Order on a change: every sidecar's trust first (so peers accept a rotated key before it is presented),
then the certificates. A file that fails keeps the last vetted one and is logged; it is retried when it
changes again. Kubernetes and Compose renders read the mounted files directly (docs/certificates.md).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.errors import PkiError
from aivo_mesh.pki import CertLayout, Identity, load_identity, store
from aivo_mesh.pki.crypto import parse_certs
from aivo_mesh.pki.issue import known_identities
from aivo_mesh.pki.load import FileSignature, file_signature
from aivo_mesh.pki.peer import PeerPolicy, Role
from aivo_mesh.render import serialize
from aivo_mesh.render.envoy import MESH_CA_FILE, TLS_CERT_FILE, tls_certificate_secret, validation_secret

log = logging.getLogger(__name__)

PUBLISH_INTERVAL = 1.0  # seconds between looks at the certs directory


@dataclass(frozen=True)
class Vetted:
    identity: Identity
    pin: str
    serial: int


def roles_of(mesh: MeshSpec, name: str) -> tuple[Role, ...]:
    """A service serves and calls; a client identity (mesh-client) only calls."""
    return ("server", "client") if name in mesh.service_names else ("client",)


class SidecarCertificates:
    def __init__(self, certs: CertLayout, mesh: MeshSpec, envoy_dirs: dict[str, Path]) -> None:
        self.certs = certs
        self.mesh = mesh
        self.envoy_dirs = envoy_dirs  # service -> <state>/envoy/<svc>
        self.policy = PeerPolicy.from_mesh(mesh)
        self.current: dict[str, Vetted] = {}
        self.previous: dict[str, Vetted] = {}
        self._seen: dict[str, tuple[FileSignature, ...]] = {}  # files as last looked at, vetted or not
        self.problems: dict[str, str] = {}
        self._written_pins: list[str] | None = None  # None: nothing written yet

    def set_mesh(self, mesh: MeshSpec) -> None:
        """mesh.yaml's certificates block changed (a revocation): re-vet everything."""
        self.mesh = mesh
        self.policy = PeerPolicy.from_mesh(mesh)
        self._seen.clear()

    # -- vetting ---------------------------------------------------------------------------------
    def _vet(self, name: str) -> Vetted | None:
        cert, key = self.certs.identity_paths(name)
        signature = file_signature(cert, key, self.certs.ca_cert)
        if self._seen.get(name) == signature:
            return None  # unchanged since last time (vetted or refused)
        self._seen[name] = signature
        try:
            ident = load_identity(cert, key, self.certs.ca_cert, expect_spiffe_id=self.mesh.spiffe_id(name),
                                  roles=roles_of(self.mesh, name))
            leaf = parse_certs(ident.cert_chain_pem, str(cert))[0]
            refused = self.policy.vetted(leaf, roles_of(self.mesh, name))
            if refused is not None:
                raise PkiError(str(cert), str(refused))
        except PkiError as exc:
            if self.problems.get(name) != str(exc):
                log.error("%s: certificate not published to the sidecars, they keep the last vetted one: %s",
                          name, exc)
            self.problems[name] = str(exc)
            return None
        self.problems.pop(name, None)
        return Vetted(ident, ident.spki_pin, ident.serial)

    def pins(self) -> list[str]:
        revoked = self.policy.revoked_spki
        serials = self.policy.revoked_serials
        return sorted({v.pin for v in (*self.current.values(), *self.previous.values())
                       if v.pin not in revoked and v.serial not in serials})

    # -- publishing ------------------------------------------------------------------------------
    def refresh(self) -> set[str]:
        """Vet what changed on disk (nothing is written); the identities whose vetted certificate changed.
        The control plane calls this to know the keys it sends as trust over ADS."""
        changed: dict[str, Vetted] = {}
        for name in known_identities(self.mesh):
            vetted = self._vet(name)
            if vetted is not None and (name not in self.current or self.current[name].serial != vetted.serial
                                       or self.current[name].identity.ca_pem != vetted.identity.ca_pem):
                changed[name] = vetted
        for name, vetted in changed.items():
            if name in self.current and self.current[name].serial != vetted.serial:
                self.previous[name] = self.current[name]
            self.current[name] = vetted
        return set(changed)

    def bundle(self) -> bytes | None:
        """The trust bundle of the vetted certificates (they share one CA bundle), or None before any."""
        return next((v.identity.ca_pem for v in self.current.values()), None)

    def publish(self) -> bool:
        """Vet what changed and write what passed; True when any sidecar's files were written."""
        changed = self.refresh()
        if not changed and self._written_pins == self.pins():
            return False
        pins = self.pins()
        # Trust first, everywhere: a rotated key must be accepted before anyone presents it.
        for service, d in self.envoy_dirs.items():
            if service in self.current:
                self._write_trust(d, self.current[service].identity, pins)
        for service, d in self.envoy_dirs.items():
            if service in self.current:
                self._write_certificate(d, service, self.current[service].identity)
        self._written_pins = pins
        return True

    def _write_trust(self, d: Path, ident: Identity, pins: list[str]) -> None:
        vetted = d / "vetted"
        store.ensure_dir(vetted, 0o700)
        ca = vetted / "ca.crt"
        if not ca.exists() or ca.read_bytes() != ident.ca_pem:
            store.write_atomic(ca, ident.ca_pem, 0o644)
        doc = validation_secret(str(ca.resolve()), str(vetted.resolve()), spki_pins=pins)
        _write_if_changed(d / "sds" / MESH_CA_FILE, serialize(MESH_CA_FILE, doc).encode())

    def _write_certificate(self, d: Path, service: str, ident: Identity) -> None:
        vetted = d / "vetted"
        store.ensure_dir(vetted, 0o700)
        cert, key = vetted / f"{service}.crt", vetted / f"{service}-key.pem"
        # Unchanged files are not rewritten: each move into a watched directory makes Envoy reload.
        if not (cert.exists() and cert.read_bytes() == ident.cert_chain_pem and key.read_bytes() == ident.key_pem):
            store.write_pair_atomic(cert, ident.cert_chain_pem, key, ident.key_pem)
        doc = tls_certificate_secret(str(cert.resolve()), str(key.resolve()), str(vetted.resolve()))
        _write_if_changed(d / "sds" / TLS_CERT_FILE, serialize(TLS_CERT_FILE, doc).encode())

    async def follow(self, interval: float = PUBLISH_INTERVAL) -> None:
        """Publish changes until cancelled (the supervisor runs this for the sidecar plane)."""
        while True:
            await asyncio.sleep(interval)
            try:
                if self.publish():
                    log.info("sidecar certificates published", extra={"pins": len(self._written_pins or ())})
            except (PkiError, OSError) as exc:  # never let a bad file stop the supervisor
                log.error("publishing sidecar certificates failed: %s", exc)



def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_atomic(path, data, 0o644)


def for_local_mesh(certs: CertLayout, mesh: MeshSpec, envoy_root: Path) -> SidecarCertificates:
    """The publisher of a local mesh whose sidecars live under `envoy_root/<svc>/`."""
    return SidecarCertificates(certs, mesh, {name: envoy_root / name for name in mesh.service_names})
