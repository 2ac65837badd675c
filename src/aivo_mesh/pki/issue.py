"""Creating the mesh CA and issuing/rotating workload certificates (X.509-SVIDs).

Pure functions over a `CertLayout`: they read and write files, raise `PkiError(file, reason)`, and never
print. See `layout.py` for the files and `notes/pki-security.md` for the choices:

- root: EC P-256 (by default), 10 years, CA:TRUE pathlen 1, keyCertSign+cRLSign; may go offline;
- issuing CA (intermediate): CA:TRUE pathlen 0, signed by the root, by default as long as the root;
- leaves: fresh key per issue, CA:FALSE, KeyUsage digitalSignature (critical), EKU serverAuth+clientAuth,
  SANs: `svc`, `svc.<ns>`, `svc.<ns>.svc`, `svc.<ns>.svc.cluster.local`, `localhost`, IP 127.0.0.1 and
  exactly one URI SAN, the SPIFFE ID; notBefore backdated one minute; SHA-256; SKI + AKI everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.errors import PkiError
from aivo_mesh.pki import store
from aivo_mesh.pki.crypto import (
    DEFAULT_KEY_TYPE,
    PrivateKey,
    cert_pem,
    cert_sha256,
    generate_key,
    is_ca,
    key_matches_cert,
    key_pem,
    key_type_of,
    now_utc,
    parse_certs,
    parse_key_type,
    parse_private_key,
    spki_pin,
    subject_str,
    weak_key_reason,
    weak_signature_reason,
)
from aivo_mesh.pki.layout import CertLayout
from aivo_mesh.pki.params import LEAF_VALID_DAYS, ROOT_VALID_DAYS

BACKDATE = timedelta(minutes=1)
ORGANIZATION = "aivo-mesh"
LOCALHOST_NAMES: tuple[str, ...] = ("localhost",)
LOCALHOST_IPS: tuple[str, ...] = ("127.0.0.1",)

_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


@dataclass(frozen=True)
class IssuedCert:
    """What was written for one certificate."""

    name: str
    cert_path: Path
    key_path: Path | None  # None when the key was not written (never for leaves)
    subject: str
    serial: int
    not_before: datetime
    not_after: datetime
    spki_pin: str
    cert_sha256: str
    key_type: str


@dataclass(frozen=True)
class CaInfo:
    """The CA created by `init_ca`: the root, the issuing intermediate and the trust bundle."""

    root: IssuedCert
    issuer: IssuedCert
    bundle_path: Path


@dataclass(frozen=True)
class Issuer:
    """The online issuing CA, loaded from `ca/ca.crt` (first certificate) and `ca/ca-key.pem`."""

    cert: x509.Certificate
    key: PrivateKey
    bundle: tuple[x509.Certificate, ...]

    @property
    def self_signed(self) -> bool:
        return self.cert.issuer == self.cert.subject


# --- helpers ----------------------------------------------------------------------------------------


def _check_days(days: int, file: Path | str, what: str = "validity") -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise PkiError(str(file), f"{what} must be a positive number of days, got {days!r}")


def _info(name: str, cert: x509.Certificate, cert_path: Path, key_path: Path | None) -> IssuedCert:
    return IssuedCert(
        name=name,
        cert_path=cert_path,
        key_path=key_path,
        subject=subject_str(cert),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        spki_pin=spki_pin(cert),
        cert_sha256=cert_sha256(cert),
        key_type=key_type_of(cert.public_key()) or type(cert.public_key()).__name__,
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )


def _leaf_key_usage(key: PrivateKey) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),  # TLS 1.2 RSA key exchange only
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )


def known_identities(mesh: MeshSpec) -> tuple[str, ...]:
    """Every name a certificate can be issued for: the services, the client identities, then the control
    plane's."""
    names = [*mesh.service_names, *(c for c in mesh.mesh.clients if c not in mesh.service_names)]
    if mesh.control_plane.identity not in names:
        names.append(mesh.control_plane.identity)
    return tuple(names)


def check_identity(mesh: MeshSpec, name: str, layout: CertLayout | None = None) -> None:
    """PkiError unless `name` is a service or client of mesh.yaml (the message lists the known names)."""
    if name in known_identities(mesh):
        return
    where = name
    if layout is not None:
        try:
            where = str(layout.identity_paths(name)[0])
        except ValueError:
            where = name
    raise PkiError(
        where,
        f"unknown service {name!r}: mesh.yaml defines services {', '.join(mesh.service_names)}, "
        f"clients {', '.join(mesh.mesh.clients)} and the control plane {mesh.control_plane.identity}",
    )


def dns_names_for(mesh: MeshSpec, name: str) -> tuple[str, ...]:
    ns = mesh.mesh.namespace
    return (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local", *LOCALHOST_NAMES)


def expected_sans(mesh: MeshSpec, name: str) -> x509.SubjectAlternativeName:
    """The SAN extension of `name`'s leaf: DNS names, IPAddress 127.0.0.1, one SPIFFE URI."""
    entries: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names_for(mesh, name)]
    entries += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOCALHOST_IPS]
    entries.append(x509.UniformResourceIdentifier(mesh.spiffe_id(name)))
    return x509.SubjectAlternativeName(entries)


# --- CA ---------------------------------------------------------------------------------------------


def init_ca(
    layout: CertLayout,
    trust_domain: str,
    valid_days: int = ROOT_VALID_DAYS,
    force: bool = False,
    *,
    issuer_valid_days: int | None = None,
    key_type: str = DEFAULT_KEY_TYPE,
    now: datetime | None = None,
) -> CaInfo:
    """Create the root CA and the issuing intermediate under `layout.ca_dir`.

    Refuses (PkiError naming the file) to replace an existing CA unless `force`; replacing the CA
    invalidates every leaf issued before, so they must be re-issued (`meshctl certs issue --all`).
    `issuer_valid_days` defaults to `valid_days` and cannot exceed it.
    """
    kt = parse_key_type(key_type)
    _check_days(valid_days, layout.root_cert, "CA validity")
    inter_days = valid_days if issuer_valid_days is None else issuer_valid_days
    _check_days(inter_days, layout.issuer_cert, "issuing CA validity")
    if inter_days > valid_days:
        raise PkiError(
            str(layout.issuer_cert),
            f"issuing CA validity ({inter_days} days) cannot exceed the root's ({valid_days} days)",
        )
    if not _TRUST_DOMAIN.match(trust_domain):
        raise PkiError(
            str(layout.root_cert), f"invalid trust domain {trust_domain!r} (expected e.g. aivo.local)"
        )
    if not force:
        for f in layout.ca_files():
            if f.exists():
                raise PkiError(
                    str(f), "a CA already exists here; pass --force to replace it "
                    "(every certificate issued by the old CA must then be re-issued)",
                )

    now = now or now_utc()
    root_key = generate_key(kt)
    root_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} root CA"),
    ])
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root_aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski)
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name).issuer_name(root_name).public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(root_ski, critical=False)
        .add_extension(root_aki, critical=False)
        .sign(root_key, hashes.SHA256())
    )

    inter_key = generate_key(kt)
    inter_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} issuing CA"),
    ])
    inter_not_after = min(now + timedelta(days=inter_days), root.not_valid_after_utc)
    inter = (
        x509.CertificateBuilder()
        .subject_name(inter_name).issuer_name(root_name).public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(inter_not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False)
        .add_extension(root_aki, critical=False)
        .sign(root_key, hashes.SHA256())
    )

    if not layout.root.exists():
        store.ensure_dir(layout.root, store.PUBLIC_DIR_MODE)
    store.ensure_dir(layout.ca_dir, store.PRIVATE_DIR_MODE)
    store.write_key(layout.root_key, key_pem(root_key))
    store.write_cert(layout.root_cert, cert_pem(root))
    store.write_key(layout.ca_key, key_pem(inter_key))
    store.write_cert(layout.issuer_cert, cert_pem(inter))
    # The bundle last: until it exists, nothing can issue or verify against a half-made CA.
    store.write_cert(layout.ca_bundle, cert_pem(inter) + cert_pem(root))
    return CaInfo(
        root=_info("root", root, layout.root_cert, layout.root_key),
        issuer=_info("ca", inter, layout.issuer_cert, layout.ca_key),
        bundle_path=layout.ca_bundle,
    )


def load_issuer(layout: CertLayout, now: datetime | None = None) -> Issuer:
    """The issuing CA (first certificate of ca/ca.crt + ca/ca-key.pem), checked to be usable."""
    bundle = parse_certs(store.read_bytes(layout.ca_bundle, "CA bundle"), str(layout.ca_bundle), "CA bundle")
    problem = store.key_permission_problem(layout.ca_key)
    if problem is not None:
        raise PkiError(str(layout.ca_key), problem)
    key = parse_private_key(store.read_bytes(layout.ca_key, "CA key"), str(layout.ca_key))
    cert = bundle[0]
    if not key_matches_cert(key, cert):
        raise PkiError(
            str(layout.ca_key),
            f"does not match the first certificate of {layout.ca_bundle} ({subject_str(cert)})",
        )
    if not is_ca(cert):
        raise PkiError(str(layout.ca_bundle), f"{subject_str(cert)} is not a CA certificate (CA:FALSE)")
    for reason in (weak_key_reason(cert.public_key()), weak_signature_reason(cert)):
        if reason:
            raise PkiError(str(layout.ca_bundle), reason)
    now = now or now_utc()
    if now >= cert.not_valid_after_utc:
        raise PkiError(
            str(layout.ca_bundle),
            f"the issuing CA expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z; "
            "renew it (meshctl certs init --force)",
        )
    return Issuer(cert=cert, key=key, bundle=tuple(bundle))


# --- leaves -----------------------------------------------------------------------------------------


def check_within_ca(issuer: Issuer, valid_days: int, now: datetime, file: Path | str) -> datetime:
    """The leaf's notAfter for `valid_days`; PkiError if it is not positive or outlives the issuing CA."""
    _check_days(valid_days, file)
    not_after = now + timedelta(days=valid_days)
    ca_end = issuer.cert.not_valid_after_utc
    if not_after > ca_end:
        max_days = (ca_end - now).days
        raise PkiError(
            str(file),
            f"a validity of {valid_days} days would end {not_after:%Y-%m-%d}, after the issuing CA expires "
            f"({ca_end:%Y-%m-%d}); use --valid-days {max_days} or less, or renew the CA",
        )
    return not_after


def build_leaf(
    issuer: Issuer,
    mesh: MeshSpec,
    name: str,
    key: PrivateKey,
    valid_days: int,
    now: datetime,
    file: Path | str = "<leaf>",
) -> x509.Certificate:
    """Sign the leaf certificate of `name` (no I/O)."""
    not_after = check_within_ca(issuer, valid_days, now, file)
    try:
        issuer_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, mesh.mesh.namespace),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .add_extension(expected_sans(mesh, name), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )


def _chain_pem(leaf: x509.Certificate, issuer: Issuer) -> bytes:
    # Servers must send leaf + intermediate; a self-signed issuer is already the anchor.
    return cert_pem(leaf) + (b"" if issuer.self_signed else cert_pem(issuer.cert))


def _write_leaf(
    layout: CertLayout, mesh: MeshSpec, name: str, issuer: Issuer, valid_days: int, key_type: str,
    now: datetime,
) -> IssuedCert:
    cert_path, key_path = layout.identity_paths(name)
    kt = parse_key_type(key_type)
    _check_days(valid_days, cert_path)
    key = generate_key(kt)
    leaf = build_leaf(issuer, mesh, name, key, valid_days, now, cert_path)
    if cert_path.parent == layout.services_dir:
        store.ensure_dir(layout.services_dir, store.PUBLIC_DIR_MODE)
    store.write_pair_atomic(cert_path, _chain_pem(leaf, issuer), key_path, key_pem(key))
    return _info(name, leaf, cert_path, key_path)


def issue_leaf(
    layout: CertLayout,
    name: str,
    mesh: MeshSpec,
    valid_days: int = LEAF_VALID_DAYS,
    *,
    key_type: str = DEFAULT_KEY_TYPE,
    now: datetime | None = None,
) -> IssuedCert:
    """Issue (or re-issue, with a new key) the leaf of a service or client identity of mesh.yaml."""
    check_identity(mesh, name, layout)
    cert_path, _ = layout.identity_paths(name)
    _check_days(valid_days, cert_path)
    parse_key_type(key_type)
    now = now or now_utc()
    return _write_leaf(layout, mesh, name, load_issuer(layout, now), valid_days, key_type, now)


def issue_all(
    layout: CertLayout,
    mesh: MeshSpec,
    valid_days: int = LEAF_VALID_DAYS,
    *,
    key_type: str = DEFAULT_KEY_TYPE,
    now: datetime | None = None,
) -> list[IssuedCert]:
    """Issue every service's leaf and every client identity's leaf."""
    return [
        issue_leaf(layout, n, mesh, valid_days, key_type=key_type, now=now) for n in known_identities(mesh)
    ]


def _needs_renewal(
    layout: CertLayout, mesh: MeshSpec, name: str, issuer: Issuer, now: datetime, renew_before: timedelta
) -> bool:
    cert_path, key_path = layout.identity_paths(name)
    try:
        leaf = parse_certs(store.read_bytes(cert_path), str(cert_path))[0]
        key = parse_private_key(store.read_bytes(key_path), str(key_path))
    except PkiError:
        return True
    if not key_matches_cert(key, leaf) or leaf.issuer != issuer.cert.subject:
        return True
    try:
        leaf.verify_directly_issued_by(issuer.cert)
    except (InvalidSignature, ValueError, TypeError):
        return True
    return leaf.not_valid_after_utc - now <= renew_before


def _existing_key_type(layout: CertLayout, mesh: MeshSpec, name: str) -> str:
    cert_path, _ = layout.identity_paths(name)
    try:
        leaf = parse_certs(store.read_bytes(cert_path), str(cert_path))[0]
    except PkiError:
        return DEFAULT_KEY_TYPE
    return key_type_of(leaf.public_key()) or DEFAULT_KEY_TYPE


def rotate(
    layout: CertLayout,
    mesh: MeshSpec,
    names: Iterable[str] | None = None,
    valid_days: int = LEAF_VALID_DAYS,
    renew_before_days: int | None = None,
    *,
    key_type: str | None = None,
    now: datetime | None = None,
) -> list[IssuedCert]:
    """Re-issue leaves with NEW keys in place (atomic per file, same layout); the CA is not touched.

    `names` defaults to every service and client identity. With `renew_before_days=None` every named
    leaf is re-issued; otherwise only those that are missing, unreadable, not issued by the current
    issuing CA, or expire within `renew_before_days` days. `key_type=None` keeps each leaf's current
    key type. Returns what was re-issued, in order.
    """
    wanted = list(known_identities(mesh) if names is None else names)
    for n in wanted:
        check_identity(mesh, n, layout)
    for n in wanted:
        _check_days(valid_days, layout.identity_paths(n)[0])
    if renew_before_days is not None and (isinstance(renew_before_days, bool) or renew_before_days < 0):
        raise PkiError(
            "--renew-before-days", f"must be a non-negative number of days, got {renew_before_days!r}"
        )
    if key_type is not None:
        parse_key_type(key_type)
    now = now or now_utc()
    issuer = load_issuer(layout, now)
    # Check every validity window before writing anything: all or nothing for the easy failure.
    for n in dict.fromkeys(wanted):
        check_within_ca(issuer, valid_days, now, layout.identity_paths(n)[0])
    done: list[IssuedCert] = []
    for n in dict.fromkeys(wanted):
        if renew_before_days is not None and not _needs_renewal(
            layout, mesh, n, issuer, now, timedelta(days=renew_before_days)
        ):
            continue
        kt = key_type or _existing_key_type(layout, mesh, n)
        done.append(_write_leaf(layout, mesh, n, issuer, valid_days, kt, now))
    return done
