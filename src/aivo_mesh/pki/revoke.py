"""Revocation: what `meshctl certs revoke` adds to mesh.yaml, and the CRL Envoy reads.

mesh.yaml's `certificates.revoked` is the one list (serials and/or SPKI pins). The proxyless plane checks
it directly (pki/peer.py). Envoy cannot read mesh.yaml: for it the list's serials become a CRL signed by
the issuing CA (`ca/crl.pem`, referenced by the rendered validation contexts with
`only_verify_leaf_cert_crl`), and, on the local mesh, revoked keys drop out of the allow-list of keys
Envoy accepts (runtime/sidecar_certs.py). An SPKI entry has no serial, so a static Envoy render can refuse
it only through a serial revoked beside it (`certs revoke SERVICE` writes both).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from aivo_mesh.config.model import MeshSpec, normalize_serial
from aivo_mesh.errors import PkiError
from aivo_mesh.pki import store
from aivo_mesh.pki.crypto import now_utc, parse_certs, spki_pin
from aivo_mesh.pki.issue import known_identities, load_issuer
from aivo_mesh.pki.layout import CertLayout


@dataclass(frozen=True)
class Revocation:
    """One entry of `certificates.revoked`, as written to mesh.yaml."""

    serial: str | None
    spki: str | None
    identity: str | None
    note: str

    def as_yaml_fields(self) -> dict[str, str]:
        fields = {"serial": self.serial, "spki": self.spki, "identity": self.identity, "note": self.note}
        return {k: v for k, v in fields.items() if v}


def leaf_revocation(layout: CertLayout, mesh: MeshSpec, name: str, note: str) -> Revocation:
    """The entry revoking `name`'s current certificate: its serial and its key."""
    cert_path, _ = layout.identity_paths(name)
    leaf = parse_certs(store.read_bytes(cert_path, "certificate"), str(cert_path))[0]
    return Revocation(f"{leaf.serial_number:x}", spki_pin(leaf), name, note)


def revocation_for(layout: CertLayout, mesh: MeshSpec, target: str, note: str) -> Revocation:
    """`meshctl certs revoke TARGET`: an identity of mesh.yaml (its current certificate) or a hex serial."""
    if target in known_identities(mesh):
        return leaf_revocation(layout, mesh, target, note)
    try:
        return Revocation(normalize_serial(target), None, None, note)
    except ValueError:
        raise PkiError(target, f"not an identity of mesh.yaml ({', '.join(known_identities(mesh))}) "
                               "nor a hex certificate serial") from None


def crl_pem(layout: CertLayout, serials: Iterable[int], now: datetime | None = None) -> bytes:
    """A CRL of `serials`, signed by the issuing CA, valid until the issuing CA expires (so a mesh never
    stops accepting every certificate because nobody re-signed a CRL in time)."""
    now = now or now_utc()
    issuer = load_issuer(layout, now)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(issuer.cert.subject)
               .last_update(now - timedelta(minutes=1))
               .next_update(issuer.cert.not_valid_after_utc)
               .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False))
    try:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    except x509.ExtensionNotFound:
        pass
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(minutes=1)).build())
    crl = builder.sign(issuer.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def revoked_serials(mesh: MeshSpec) -> list[int]:
    return [int(r.serial, 16) for r in mesh.certificates.revoked if r.serial is not None]


def write_crl(layout: CertLayout, mesh: MeshSpec, now: datetime | None = None) -> bytes:
    """Write `ca/crl.pem` for mesh.yaml's revoked serials (atomically, 0644); returns it."""
    pem = crl_pem(layout, revoked_serials(mesh), now)
    store.write_cert(layout.crl, pem)
    return pem
