"""Checking a whole certs directory against mesh.yaml (`meshctl certs verify` / `inspect`).

Unlike `load_identity`, which stops at the first problem, this collects every problem of every
certificate so an operator sees the full picture in one run.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.errors import PkiError
from aivo_mesh.pki import store
from aivo_mesh.pki.chain import chain_problem
from aivo_mesh.pki.crypto import (
    basic_constraints,
    cert_sha256,
    key_matches_cert,
    looks_like_ip,
    now_utc,
    parse_certs,
    parse_private_key,
    render_sans,
    san_names,
    spki_pin,
    subject_str,
    weak_key_reason,
    weak_signature_reason,
)
from aivo_mesh.pki.issue import LOCALHOST_IPS, dns_names_for, known_identities
from aivo_mesh.pki.layout import CertLayout
from aivo_mesh.pki.peer import PeerPolicy, Role, leaf_problems


@dataclass
class CertReport:
    """One certificate's facts and every problem found with it (`ok` when there is none)."""

    name: str
    path: Path
    subject: str = ""
    sans: list[str] = field(default_factory=list)
    not_after: datetime | None = None
    days_left: int | None = None
    spki_pin: str | None = None
    cert_sha256: str | None = None
    serial: int | None = None
    key_path: Path | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "path": str(self.path),
            "key_path": str(self.key_path) if self.key_path else None,
            "subject": self.subject,
            "sans": list(self.sans),
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "days_left": self.days_left,
            "serial": f"{self.serial:x}" if self.serial is not None else None,
            "spki_pin": self.spki_pin,
            "cert_sha256": self.cert_sha256,
            "ok": self.ok,
            "problems": list(self.problems),
        }


def _fill(report: CertReport, cert: x509.Certificate, now: datetime) -> None:
    report.subject = subject_str(cert)
    report.sans = render_sans(cert)
    report.not_after = cert.not_valid_after_utc
    report.days_left = (cert.not_valid_after_utc - now).days
    report.spki_pin = spki_pin(cert)
    report.cert_sha256 = cert_sha256(cert)
    report.serial = cert.serial_number


def _validity_problems(cert: x509.Certificate, now: datetime) -> list[str]:
    if now < cert.not_valid_before_utc:
        return [f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z"]
    if now >= cert.not_valid_after_utc:
        return [f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"]
    return []


def _key_problems(cert: x509.Certificate, key_path: Path, required: bool) -> list[str]:
    if not key_path.exists():
        return [f"private key {key_path} not found"] if required else []
    perm = store.key_permission_problem(key_path)
    problems = [perm] if perm else []
    try:
        key = parse_private_key(store.read_bytes(key_path, "private key"), str(key_path))
    except PkiError as exc:
        return [*problems, f"{exc.reason} ({key_path})"]
    if not key_matches_cert(key, cert):
        problems.append(f"private key {key_path} does not match the certificate")
    return problems


def _read_chain(report: CertReport, what: str) -> list[x509.Certificate] | None:
    try:
        return parse_certs(store.read_bytes(report.path, what), str(report.path), what)
    except PkiError as exc:
        report.problems.append(exc.reason)
        return None


def _ca_reports(layout: CertLayout, now: datetime) -> tuple[list[CertReport], list[x509.Certificate]]:
    head = CertReport("ca", layout.ca_bundle, key_path=layout.ca_key)
    bundle = _read_chain(head, "CA bundle")
    if bundle is None:
        return [head], []
    reports: list[CertReport] = []
    for i, cert in enumerate(bundle):
        if i == 0:
            r = head
        elif cert.issuer == cert.subject:
            r = CertReport("root" if i == 1 else f"root[{i}]", layout.ca_bundle)
        else:
            r = CertReport(f"ca[{i}]", layout.ca_bundle)
        _fill(r, cert, now)
        bc = basic_constraints(cert)
        if bc is None or not bc.ca:
            r.problems.append("not a CA certificate (BasicConstraints CA:TRUE missing)")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.key_cert_sign:
                r.problems.append("KeyUsage lacks keyCertSign")
        except x509.ExtensionNotFound:
            pass
        r.problems += _validity_problems(cert, now)
        for reason in (weak_key_reason(cert.public_key()),
                       None if cert.issuer == cert.subject else weak_signature_reason(cert)):
            if reason:
                r.problems.append(reason)
        reports.append(r)
    # Keys: the issuing CA key must match the first certificate; the root key may be offline.
    head.problems += _key_problems(bundle[0], layout.ca_key, required=False)
    root_reports = [r for r in reports if r.name == "root"]
    if root_reports and layout.root_key.exists():
        root_cert = next(c for c in bundle if c.serial_number == root_reports[0].serial)
        root_reports[0].key_path = layout.root_key
        root_reports[0].problems += _key_problems(root_cert, layout.root_key, required=False)
    return reports, bundle


def _san_problems(mesh: MeshSpec, name: str, cert: x509.Certificate) -> list[str]:
    try:
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ["no SubjectAlternativeName extension"]
    dns, ips, uris, _other = san_names(cert)
    problems: list[str] = []
    missing = [d for d in dns_names_for(mesh, name) if d not in dns]
    if missing:
        problems.append(f"missing DNS SANs: {', '.join(missing)}")
    ip_objs = {ipaddress.ip_address(i) for i in ips}
    for ip in LOCALHOST_IPS:
        if ipaddress.ip_address(ip) not in ip_objs:
            problems.append(f"missing IP SAN {ip} (must be an IPAddress entry, not DNS)")
    bad_dns = [d for d in dns if looks_like_ip(d)]
    if bad_dns:
        problems.append(f"IP addresses written as DNS SANs: {', '.join(bad_dns)} (must be IPAddress entries)")
    expected = mesh.spiffe_id(name)
    if len(uris) != 1:
        found = ", ".join(uris) or "-"
        problems.append(f"expected exactly one URI SAN ({expected}), found {len(uris)}: {found}")
    elif uris[0] != expected:
        problems.append(f"URI SAN is {uris[0]}, expected {expected}")
    return problems


def _extension_problems(cert: x509.Certificate, roles: tuple[Role, ...]) -> list[str]:
    """The peer policy's rules for a leaf (every one broken, each with its rule), then what strict TLS
    stacks also want: critical BasicConstraints and KeyUsage, SKI and AKI."""
    problems = [f"{detail} ({rule})" for rule, detail in leaf_problems(cert, roles)]
    bc_ext = _optional_extension(cert, x509.BasicConstraints)
    if bc_ext is None:
        problems.append("no BasicConstraints extension (expected CA:FALSE, critical)")
    elif not bc_ext.critical:
        problems.append("BasicConstraints is not critical")
    ku_ext = _optional_extension(cert, x509.KeyUsage)
    if ku_ext is not None and not ku_ext.critical:
        problems.append("KeyUsage is not critical")
    for cls, label in ((x509.SubjectKeyIdentifier, "SubjectKeyIdentifier"),
                       (x509.AuthorityKeyIdentifier, "AuthorityKeyIdentifier")):
        if _optional_extension(cert, cls) is None:
            problems.append(f"no {label} extension (strict TLS clients refuse it)")
    return problems


def _optional_extension(cert: x509.Certificate,
                        cls: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None


def _policy_problems(mesh: MeshSpec, name: str, cert: x509.Certificate) -> list[str]:
    """What mesh.yaml's certificates block says of this certificate: revoked, or not one of its pins."""
    policy = PeerPolicy.from_mesh(mesh)
    pin = spki_pin(cert)
    problems = []
    if cert.serial_number in policy.revoked_serials or pin in policy.revoked_spki:
        problems.append(f"revoked in mesh.yaml (certificates.revoked): every peer refuses it; re-issue it "
                        f"(meshctl certs rotate {name})")
    pins = policy.pins.get(mesh.spiffe_id(name))
    if pins is not None and pin not in pins:
        problems.append(f"its key ({pin}) is not one of {name}'s pins (certificates.pins): every peer refuses it")
    return problems


def _server_chain_problem(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchors: list[x509.Certificate],
    now: datetime,
) -> str | None:
    # As a TLS client dialling 127.0.0.1 would: WebPKI rules, serverAuth EKU, an IPAddress SAN.
    subject = x509.IPAddress(ipaddress.ip_address(LOCALHOST_IPS[0]))
    try:
        verifier = PolicyBuilder().store(Store(anchors)).time(now).build_server_verifier(subject)
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        return f"rejected as a server certificate for {LOCALHOST_IPS[0]}: {exc}"
    return None


def verify_identity(
    layout: CertLayout,
    mesh: MeshSpec,
    name: str,
    anchors: list[x509.Certificate],
    now: datetime | None = None,
) -> CertReport:
    """Every problem of one service/client leaf (see module docstring)."""
    now = now or now_utc()
    cert_path, key_path = layout.identity_paths(name)
    report = CertReport(name, cert_path, key_path=key_path)
    if not cert_path.exists():
        report.problems.append("certificate not found (run: meshctl certs issue --all)")
        return report
    chain = _read_chain(report, "certificate")
    if chain is None:
        return report
    leaf = chain[0]
    _fill(report, leaf, now)
    report.problems += _validity_problems(leaf, now)
    roles: tuple[Role, ...] = ("server", "client") if name in mesh.service_names else ("client",)
    report.problems += _extension_problems(leaf, roles)
    report.problems += _san_problems(mesh, name, leaf)
    report.problems += _policy_problems(mesh, name, leaf)
    report.problems += _key_problems(leaf, key_path, required=True)
    if len(chain) == 1 and any(a.subject == leaf.issuer and a.issuer != a.subject for a in anchors):
        report.problems.append(
            "certificate file lacks the intermediate CA (servers must send leaf + intermediate)"
        )
    if anchors:
        for problem in (
            chain_problem(leaf, chain[1:], anchors, now, strict=True),
            _server_chain_problem(leaf, chain[1:], anchors, now),
        ):
            if problem and problem not in report.problems:
                report.problems.append(problem)
    else:
        report.problems.append("cannot check the chain: no usable CA bundle")
    return report


def verify_layout(layout: CertLayout, mesh: MeshSpec, *, now: datetime | None = None) -> list[CertReport]:
    """Reports for the CA bundle certificates, then every service and client identity of mesh.yaml."""
    now = now or now_utc()
    reports, anchors = _ca_reports(layout, now)
    for name in known_identities(mesh):
        reports.append(verify_identity(layout, mesh, name, anchors, now))
    return reports


def inspect_layout(
    layout: CertLayout, *, now: datetime | None = None
) -> list[CertReport]:
    """Facts (no mesh.yaml checks) about every certificate found in the directory.

    Reported as problems: unreadable files and certificates outside their validity (what `verify`
    also reports for them, so both exit 1 on the same problem).
    """
    now = now or now_utc()
    reports: list[CertReport] = []
    if layout.ca_bundle.exists():
        head = CertReport("ca", layout.ca_bundle, key_path=layout.ca_key)
        bundle = _read_chain(head, "CA bundle")
        if bundle is None:
            reports.append(head)
        for i, cert in enumerate(bundle or []):
            r = head if i == 0 else CertReport(
                ("root" if i == 1 else f"root[{i}]") if cert.issuer == cert.subject else f"ca[{i}]",
                layout.ca_bundle,
            )
            _fill(r, cert, now)
            r.problems += _validity_problems(cert, now)
            reports.append(r)
    names = [*layout.issued_service_names(), *layout.issued_client_names()]
    for name in names:
        cert_path, key_path = layout.identity_paths(name)
        r = CertReport(name, cert_path, key_path=key_path)
        chain = _read_chain(r, "certificate")
        if chain is not None:
            _fill(r, chain[0], now)
            r.problems += _validity_problems(chain[0], now)
        reports.append(r)
    return reports
