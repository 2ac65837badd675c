"""The mesh PKI library: issued certificates, files, refusals, load_identity, rotate and verify.

Real files under tmp_path and the real `openssl` CLI (tests needing it skip when it is missing).
The session fixture `mesh_certs` (tests/conftest.py) is read-only: tests that change files copy it.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import stat
import subprocess
from collections.abc import Callable
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from binaries import require
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rogue_certs import mint, needs_openssl, replace_identity

from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.errors import PkiError
from aivo_mesh.pki import (
    CertLayout,
    cert_sha256,
    init_ca,
    issue_all,
    issue_leaf,
    load_identity,
    load_issuer,
    parse_key_type,
    rotate,
    spki_pin,
    verify_layout,
)
from aivo_mesh.pki.issue import build_leaf

ROOT = Path(__file__).resolve().parents[1]
MESH: MeshSpec = load_mesh(ROOT / "mesh.yaml")
IDENTITIES = [*MESH.service_names, *MESH.mesh.clients, MESH.control_plane.identity]


# --- helpers ------------------------------------------------------------------------------------------


def _leaf(layout: CertLayout, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(layout.identity_paths(name)[0].read_bytes())[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _openssl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([require("openssl"), *args], input=stdin, capture_output=True, check=False, timeout=30)


@pytest.fixture
def certs(mesh_certs: CertLayout, tmp_path: Path) -> CertLayout:
    """A private, writable copy of the session's certs directory (modes preserved)."""
    shutil.copytree(mesh_certs.root, tmp_path / "certs")
    return CertLayout(tmp_path / "certs")


# --- layout and files ---------------------------------------------------------------------------------


def test_layout_has_every_file_with_safe_modes(mesh_certs: CertLayout) -> None:
    L = mesh_certs
    assert L.ca_cert == L.root / "ca" / "ca.crt" == L.ca_bundle
    assert L.ca_key == L.root / "ca" / "ca-key.pem"
    assert L.identity_paths("auth-svc") == (
        L.root / "services/auth-svc.crt", L.root / "services/auth-svc-key.pem"
    )
    assert L.identity_paths("mesh-client") == (L.root / "mesh-client.crt", L.root / "mesh-client-key.pem")
    assert _mode(L.ca_dir) == 0o700
    for key in (L.ca_key, L.root_key, *(L.identity_paths(n)[1] for n in IDENTITIES)):
        assert _mode(key) == 0o600, key
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM"
    for cert in (L.ca_cert, L.root_cert, L.issuer_cert, *(L.identity_paths(n)[0] for n in IDENTITIES)):
        assert _mode(cert) == 0o644, cert
    leftovers = [p for p in L.root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_identity_paths_refuse_path_escapes(tmp_path: Path) -> None:
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError, match="not a valid identity name"):
            CertLayout(tmp_path).identity_paths(bad)


def test_ca_is_a_root_plus_an_issuing_intermediate(mesh_certs: CertLayout) -> None:
    bundle = x509.load_pem_x509_certificates(mesh_certs.ca_cert.read_bytes())
    assert len(bundle) == 2
    inter, root = bundle
    assert root.issuer == root.subject
    assert inter.issuer == root.subject
    inter.verify_directly_issued_by(root)
    root_bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    inter_bc = inter.extensions.get_extension_for_class(x509.BasicConstraints)
    assert root_bc.critical
    assert root_bc.value.ca
    assert root_bc.value.path_length == 1
    assert inter_bc.critical
    assert inter_bc.value.ca
    assert inter_bc.value.path_length == 0
    for c in (root, inter):
        ku = c.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical
        assert ku.value.key_cert_sign
        assert ku.value.crl_sign
        pub = c.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert pub.curve.name == "secp256r1"
        c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        c.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    assert x509.load_pem_x509_certificate(mesh_certs.root_cert.read_bytes()) == root
    assert x509.load_pem_x509_certificate(mesh_certs.issuer_cert.read_bytes()) == inter
    issuer = load_issuer(mesh_certs)  # ca-key.pem matches the first certificate of ca.crt
    assert issuer.cert == inter


# --- leaves -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IDENTITIES)
def test_leaf_sans_have_the_right_types(mesh_certs: CertLayout, name: str) -> None:
    san = _leaf(mesh_certs, name).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ns = MESH.mesh.namespace
    assert san.get_values_for_type(x509.DNSName) == [
        name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local", "localhost",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert all(isinstance(g, x509.IPAddress) for g in san if "127.0.0.1" in str(g.value))
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://aivo.local/ns/default/sa/{name}"
    ]
    assert len(list(san)) == 7


@pytest.mark.parametrize("name", IDENTITIES)
def test_leaf_extensions_and_validity(mesh_certs: CertLayout, name: str) -> None:
    leaf = _leaf(mesh_certs, name)
    issuer = x509.load_pem_x509_certificates(mesh_certs.ca_cert.read_bytes())[0]
    ext = leaf.extensions
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not (ku.value.key_cert_sign)
    assert not (ku.value.crl_sign)
    assert not (ku.value.key_encipherment)
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False
    assert bc.value.path_length is None
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == issuer_ski.digest
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.issuer == issuer.subject
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    now = datetime.now(UTC)
    assert timedelta(seconds=30) < now - leaf.not_valid_before_utc < timedelta(minutes=30)  # backdated 1 min
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=365, minutes=1)
    assert 0 < leaf.serial_number < 2**159


def test_leaf_file_holds_leaf_then_intermediate(mesh_certs: CertLayout) -> None:
    chain = x509.load_pem_x509_certificates(mesh_certs.identity_paths("auth-svc")[0].read_bytes())
    inter = x509.load_pem_x509_certificates(mesh_certs.ca_cert.read_bytes())[0]
    assert len(chain) == 2
    assert chain[1] == inter
    chain[0].verify_directly_issued_by(inter)


@needs_openssl
@pytest.mark.parametrize("name", IDENTITIES)
def test_openssl_verify_says_ok(mesh_certs: CertLayout, name: str) -> None:
    cert = mesh_certs.identity_paths(name)[0]
    for purpose in ((), ("-purpose", "sslserver"), ("-purpose", "sslclient")):
        out = _openssl("verify", *purpose, "-CAfile", str(mesh_certs.ca_cert), str(cert))
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode().strip() == f"{cert}: OK"


@needs_openssl
def test_openssl_verify_rejects_a_leaf_of_another_ca(mesh_certs: CertLayout, tmp_path: Path) -> None:
    other = CertLayout(tmp_path / "other")
    init_ca(other, "aivo.local")
    issue_leaf(other, "auth-svc", MESH)
    out = _openssl("verify", "-CAfile", str(mesh_certs.ca_cert), str(other.identity_paths("auth-svc")[0]))
    assert out.returncode != 0


@needs_openssl
def test_spki_pin_and_hash_match_the_openssl_pipelines(mesh_certs: CertLayout) -> None:
    cert_path = mesh_certs.identity_paths("auth-svc")[0]
    OPENSSL = require("openssl")
    pipeline = (
        f"'{OPENSSL}' x509 -in '{cert_path}' -noout -pubkey | '{OPENSSL}' pkey -pubin -outform DER"
        f" | '{OPENSSL}' dgst -sha256 -binary | '{OPENSSL}' enc -base64"
    )
    pin = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, check=True)
    leaf = _leaf(mesh_certs, "auth-svc")
    assert spki_pin(leaf) == pin.stdout.decode().strip()
    assert len(spki_pin(leaf)) == 44
    der = _openssl("x509", "-in", str(cert_path), "-outform", "DER").stdout
    digest = _openssl("dgst", "-sha256", "-r", stdin=der).stdout.decode().split()[0]
    assert cert_sha256(leaf) == digest
    report = next(r for r in verify_layout(mesh_certs, MESH) if r.name == "auth-svc")
    assert (report.spki_pin, report.cert_sha256) == (spki_pin(leaf), digest)


# --- refusals -----------------------------------------------------------------------------------------


def test_init_refuses_to_overwrite_a_ca_without_force(tmp_path: Path) -> None:
    layout = CertLayout(tmp_path / "certs")
    first = init_ca(layout, "aivo.local")
    before = layout.ca_cert.read_bytes()
    with pytest.raises(PkiError, match="--force") as exc:
        init_ca(layout, "aivo.local")
    assert exc.value.file.startswith(str(layout.ca_dir))
    assert layout.ca_cert.read_bytes() == before
    second = init_ca(layout, "aivo.local", force=True)
    assert second.root.serial != first.root.serial
    assert layout.ca_cert.read_bytes() != before


def test_init_refuses_bad_arguments(tmp_path: Path) -> None:
    layout = CertLayout(tmp_path / "certs")
    with pytest.raises(PkiError, match="positive"):
        init_ca(layout, "aivo.local", valid_days=0)
    with pytest.raises(PkiError, match="cannot exceed"):
        init_ca(layout, "aivo.local", valid_days=10, issuer_valid_days=20)
    with pytest.raises(PkiError, match="trust domain"):
        init_ca(layout, "spiffe://Bad/")
    assert not layout.ca_dir.exists()


def test_issue_refuses_an_unknown_service_listing_the_known_ones(certs: CertLayout) -> None:
    with pytest.raises(PkiError) as exc:
        issue_leaf(certs, "payments-svc", MESH)
    msg = str(exc.value)
    assert "payments-svc" in msg
    for name in IDENTITIES:
        assert name in msg
    assert not certs.identity_paths("payments-svc")[0].exists()


@pytest.mark.parametrize("days", [0, -1])
def test_issue_refuses_non_positive_validity(certs: CertLayout, days: int) -> None:
    before = certs.identity_paths("auth-svc")[0].read_bytes()
    with pytest.raises(PkiError, match="positive"):
        issue_leaf(certs, "auth-svc", MESH, valid_days=days)
    assert certs.identity_paths("auth-svc")[0].read_bytes() == before


def test_issue_refuses_a_leaf_outliving_the_ca(tmp_path: Path) -> None:
    layout = CertLayout(tmp_path / "certs")
    init_ca(layout, "aivo.local", valid_days=10)
    with pytest.raises(PkiError, match="after the issuing CA expires"):
        issue_leaf(layout, "auth-svc", MESH, valid_days=30)
    issue_leaf(layout, "auth-svc", MESH, valid_days=5)


def test_issue_without_a_ca_names_the_missing_bundle(tmp_path: Path) -> None:
    layout = CertLayout(tmp_path / "certs")
    with pytest.raises(PkiError) as exc:
        issue_leaf(layout, "auth-svc", MESH)
    assert exc.value.file == str(layout.ca_cert)


@pytest.mark.parametrize("bad", ["rsa-1024", "rsa-512", "dsa-1024", "ec-p192"])
def test_weak_or_unknown_key_types_are_refused(certs: CertLayout, bad: str) -> None:
    with pytest.raises(PkiError, match="2048" if bad.startswith("rsa") else "expected one of"):
        parse_key_type(bad)
    with pytest.raises(PkiError):
        issue_leaf(certs, "auth-svc", MESH, key_type=bad)


def test_rsa_2048_leaves_are_valid(certs: CertLayout) -> None:
    issued = issue_leaf(certs, "learner-svc", MESH, key_type="rsa-2048")
    assert issued.key_type == "rsa-2048"
    leaf = _leaf(certs, "learner-svc")
    assert isinstance(leaf.public_key(), rsa.RSAPublicKey)
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    report = next(r for r in verify_layout(certs, MESH) if r.name == "learner-svc")
    assert report.ok, report.problems
    load_identity(*certs.identity_paths("learner-svc"), certs.ca_cert)


# --- load_identity ------------------------------------------------------------------------------------


def test_load_identity_returns_what_grpc_needs(mesh_certs: CertLayout) -> None:
    cert, key = mesh_certs.identity_paths("auth-svc")
    ident = load_identity(cert, key, mesh_certs.ca_cert)
    leaf = _leaf(mesh_certs, "auth-svc")
    assert ident.spiffe_id == "spiffe://aivo.local/ns/default/sa/auth-svc"
    assert ident.dns_names[0] == "auth-svc"
    assert "localhost" in ident.dns_names
    assert ident.serial == leaf.serial_number
    assert ident.not_after == leaf.not_valid_after_utc
    assert ident.spki_pin == spki_pin(leaf)
    assert ident.cert_chain_pem == cert.read_bytes()
    assert ident.key_pem == key.read_bytes()
    assert ident.ca_pem == mesh_certs.ca_cert.read_bytes()
    assert (ident.cert_path, ident.key_path, ident.ca_path) == (cert, key, mesh_certs.ca_cert)
    assert ident.mtime_signature() == ident.mtime_signature()
    assert ident.mtime_signature() == type(ident).signature_of(cert, key, mesh_certs.ca_cert)
    assert 360 * 86400 < ident.seconds_left() <= 365 * 86400
    assert "PRIVATE" not in repr(ident)


def _sign(
    layout: CertLayout,
    *,
    sans: list[x509.GeneralName] | None = None,
    ca: bool = False,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    usages: bool = True,
) -> bytes:
    """A leaf signed by the layout's issuing CA with cryptography, for shapes issue_leaf never makes.
    With `usages`, it has the KeyUsage and ExtendedKeyUsage of a proper leaf (each case then breaks one
    rule only); without, neither."""
    issuer = load_issuer(layout)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "auth-svc")]))
        .issuer_name(issuer.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=1))
        .not_valid_after(not_after or now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans or [x509.DNSName("auth-svc")]), critical=False)
    )
    if usages:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer.key, hashes.SHA256())
    cert_path, key_path = layout.identity_paths("auth-svc")
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)
    pem = cert.public_bytes(serialization.Encoding.PEM) + issuer.cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return pem


def _openssl_leaf(layout: CertLayout, newkey: str, digest: str) -> None:
    """Replace auth-svc's cert+key by one made with the openssl CLI and signed by the mesh's issuing CA."""
    cert, key = mint(layout, MESH, "auth-svc", layout.root.parent / "minted", key=newkey, digest=digest,
                     serial=4242)
    replace_identity(layout, "auth-svc", cert, key)


def _breakers() -> dict[str, tuple[Callable[[CertLayout], None], str, str]]:
    """case -> (how to break auth-svc's files, which file the error must name, a phrase of the reason)."""

    def cert(layout: CertLayout) -> Path:
        return layout.identity_paths("auth-svc")[0]

    def key(layout: CertLayout) -> Path:
        return layout.identity_paths("auth-svc")[1]

    def foreign_ca(layout: CertLayout) -> None:
        other = CertLayout(layout.root.parent / "foreign")
        init_ca(other, "aivo.local")
        issue_leaf(other, "auth-svc", MESH)
        for src, dst in zip(other.identity_paths("auth-svc"), layout.identity_paths("auth-svc"), strict=True):
            shutil.copy2(src, dst)

    now = datetime.now(UTC)
    return {
        "missing cert": (lambda L: cert(L).unlink(), "cert", "not found"),
        "missing key": (lambda L: key(L).unlink(), "key", "not found"),
        "missing ca": (lambda L: L.ca_cert.unlink(), "ca", "not found"),
        "garbage cert": (lambda L: cert(L).write_bytes(b"hello\x00world\n"), "cert", "not a PEM"),
        "empty cert": (lambda L: cert(L).write_bytes(b""), "cert", "empty"),
        "truncated cert": (lambda L: cert(L).write_bytes(cert(L).read_bytes()[:300]), "cert", "truncated"),
        "corrupt cert body": (
            lambda L: cert(L).write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "cert", "malformed",
        ),
        "garbage key": (
            lambda L: key(L).write_bytes(b"-----BEGIN PRIVATE KEY-----\nzz\n-----END PRIVATE KEY-----\n"),
            "key", "malformed",
        ),
        "empty key": (lambda L: key(L).write_bytes(b""), "key", "empty"),
        "empty ca": (lambda L: L.ca_cert.write_bytes(b"\n"), "ca", "empty"),
        "garbage ca": (lambda L: L.ca_cert.write_bytes(b"nope"), "ca", "not a PEM"),
        "key of another service": (
            lambda L: shutil.copy2(L.identity_paths("learner-svc")[1], key(L)), "key", "does not match",
        ),
        "key readable by others": (lambda L: key(L).chmod(0o644), "key", "group/others"),
        "key readable by group": (lambda L: key(L).chmod(0o640), "key", "group/others"),
        "foreign ca": (foreign_ca, "cert", "not signed by this mesh CA"),
        "two URI SANs": (
            lambda L: _sign(L, sans=[
                x509.UniformResourceIdentifier("spiffe://aivo.local/ns/default/sa/auth-svc"),
                x509.UniformResourceIdentifier("spiffe://aivo.local/ns/default/sa/admin"),
            ]),
            "cert", "more than one URI",
        ),
        "leaf with CA:TRUE": (lambda L: _sign(L, ca=True), "cert", "CA:TRUE"),
        "expired": (lambda L: _sign(L, not_before=now - timedelta(days=3), not_after=now - timedelta(days=1)),
                    "cert", "expired"),
        "not yet valid": (
            lambda L: _sign(L, not_before=now + timedelta(days=1), not_after=now + timedelta(days=3)),
            "cert", "not valid yet",
        ),
    }


@pytest.mark.parametrize("case", list(_breakers()))
def test_load_identity_names_the_bad_file(certs: CertLayout, case: str) -> None:
    breaker, which, phrase = _breakers()[case]
    breaker(certs)
    cert, key = certs.identity_paths("auth-svc")
    expected = {"cert": cert, "key": key, "ca": certs.ca_cert}[which]
    with pytest.raises(PkiError) as exc:
        load_identity(cert, key, certs.ca_cert)
    assert exc.value.file == str(expected), exc.value
    assert phrase in exc.value.reason
    assert str(expected) in str(exc.value)


@needs_openssl
@pytest.mark.parametrize(("newkey", "digest", "which", "phrase"), [
    ("ec:P-256", "sha1", "cert", "SHA1"),
    ("rsa:1024", "sha256", "cert", "1024 bits is too weak"),
])
def test_load_identity_refuses_weak_certs_made_by_openssl(
    certs: CertLayout, tmp_path: Path, newkey: str, digest: str, which: str, phrase: str
) -> None:
    _openssl_leaf(certs, newkey, digest)
    cert, key = certs.identity_paths("auth-svc")
    # The CA really signed it: only the weakness is wrong.
    assert _openssl("verify", "-CAfile", str(certs.ca_cert), str(cert)).returncode == 0
    with pytest.raises(PkiError) as exc:
        load_identity(cert, key, certs.ca_cert)
    assert exc.value.file == str(cert)
    assert phrase in exc.value.reason
    report = next(r for r in verify_layout(certs, MESH) if r.name == "auth-svc")
    assert any(phrase in p for p in report.problems), report.problems


def test_load_identity_accepts_a_union_bundle_during_ca_rollover(certs: CertLayout, tmp_path: Path) -> None:
    new = CertLayout(tmp_path / "new")
    init_ca(new, "aivo.local")
    issue_leaf(new, "auth-svc", MESH)
    union = tmp_path / "union.crt"
    union.write_bytes(certs.ca_cert.read_bytes() + new.ca_cert.read_bytes())
    load_identity(*certs.identity_paths("auth-svc"), union)
    load_identity(*new.identity_paths("auth-svc"), union)


# --- rotate -------------------------------------------------------------------------------------------


def test_rotate_reissues_with_new_keys_in_place(certs: CertLayout) -> None:
    files_before = sorted(p.relative_to(certs.root) for p in certs.root.rglob("*"))
    ca_before = {p: p.read_bytes() for p in (certs.ca_cert, certs.ca_key, certs.root_cert, certs.root_key)}
    old = {n: _leaf(certs, n) for n in IDENTITIES}
    old_key = certs.identity_paths("auth-svc")[1].read_bytes()

    rotated = rotate(certs, MESH, ["auth-svc"])

    assert [r.name for r in rotated] == ["auth-svc"]
    new = _leaf(certs, "auth-svc")
    assert new.serial_number != old["auth-svc"].serial_number
    assert rotated[0].serial == new.serial_number
    assert spki_pin(new) != spki_pin(old["auth-svc"])
    assert certs.identity_paths("auth-svc")[1].read_bytes() != old_key
    assert _leaf(certs, "learner-svc") == old["learner-svc"]
    assert sorted(p.relative_to(certs.root) for p in certs.root.rglob("*")) == files_before
    assert {p: p.read_bytes() for p in ca_before} == ca_before
    assert _mode(certs.identity_paths("auth-svc")[1]) == 0o600
    assert all(r.ok for r in verify_layout(certs, MESH))


def test_rotate_all_and_renew_before(certs: CertLayout) -> None:
    assert rotate(certs, MESH, renew_before_days=30) == []  # 364 days left everywhere
    rotated = rotate(certs, MESH, valid_days=10)
    assert [r.name for r in rotated] == IDENTITIES
    again = rotate(certs, MESH, renew_before_days=30)  # now 10 days left: all due
    assert [r.name for r in again] == IDENTITIES
    with pytest.raises(PkiError, match="unknown service"):
        rotate(certs, MESH, ["nope"])
    with pytest.raises(PkiError, match="positive"):
        rotate(certs, MESH, valid_days=0)


def test_rotate_keeps_the_key_type(certs: CertLayout) -> None:
    issue_leaf(certs, "analytics-svc", MESH, key_type="ec-p384")
    (done,) = rotate(certs, MESH, ["analytics-svc"])
    assert done.key_type == "ec-p384"


def test_rotate_reissues_leaves_of_a_replaced_ca(certs: CertLayout) -> None:
    init_ca(certs, "aivo.local", force=True)
    assert not any(r.ok for r in verify_layout(certs, MESH) if r.name in IDENTITIES)
    rotated = rotate(certs, MESH, renew_before_days=30)  # not expiring, but issued by the old CA
    assert [r.name for r in rotated] == IDENTITIES
    assert all(r.ok for r in verify_layout(certs, MESH))


# --- verify_layout ------------------------------------------------------------------------------------


def test_verify_layout_is_clean_for_issued_certs(mesh_certs: CertLayout) -> None:
    reports = verify_layout(mesh_certs, MESH)
    assert [r.name for r in reports] == ["ca", "root", *IDENTITIES]
    for r in reports:
        assert r.ok, (r.name, r.problems)
        assert r.spki_pin
        assert r.cert_sha256
        assert r.not_after
        assert r.days_left is not None
    auth = reports[2]
    assert "IP:127.0.0.1" in auth.sans
    assert "URI:spiffe://aivo.local/ns/default/sa/auth-svc" in auth.sans
    assert auth.subject.startswith("CN=auth-svc")


def test_verify_layout_reports_each_problem_on_its_certificate(certs: CertLayout) -> None:
    certs.identity_paths("learner-svc")[1].chmod(0o644)
    shutil.copy2(certs.identity_paths("analytics-svc")[1], certs.identity_paths("event-collector-svc")[1])
    certs.identity_paths("mesh-client")[0].unlink()
    _sign(certs, sans=[x509.DNSName("auth-svc"), x509.DNSName("127.0.0.1")], usages=False)  # IP as a DNS SAN
    problems = {r.name: r.problems for r in verify_layout(certs, MESH)}
    assert problems["ca"] == problems["root"] == problems["analytics-svc"] == []
    assert any("group/others" in p for p in problems["learner-svc"])
    assert any("does not match" in p for p in problems["event-collector-svc"])
    assert any("not found" in p for p in problems["mesh-client"])
    auth = " | ".join(problems["auth-svc"])
    for phrase in ("IP addresses written as DNS SANs: 127.0.0.1", "missing IP SAN 127.0.0.1",
                   "exactly one URI SAN", "missing DNS SANs", "KeyUsage", "ExtendedKeyUsage"):
        assert phrase in auth


def test_verify_layout_flags_an_expired_leaf(certs: CertLayout) -> None:
    issuer = load_issuer(certs)
    key = ec.generate_private_key(ec.SECP256R1())
    past = datetime.now(UTC) - timedelta(days=10)
    leaf = build_leaf(issuer, MESH, "auth-svc", key, 2, past)
    cert_path, key_path = certs.identity_paths("auth-svc")
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                          + issuer.cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (report,) = [r for r in verify_layout(certs, MESH) if r.name == "auth-svc"]
    assert any(p.startswith("expired on") for p in report.problems)
    assert report.days_left is not None
    assert report.days_left < 0


# --- the certificates work in TLS ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_grpc_mtls_and_python_ssl_accept_the_issued_certs(mesh_certs: CertLayout) -> None:
    server_id = load_identity(*mesh_certs.identity_paths("auth-svc"), mesh_certs.ca_cert)
    client_id = load_identity(*mesh_certs.identity_paths("mesh-client"), mesh_certs.ca_cert)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = grpc.ssl_server_credentials([(server_id.key_pem, server_id.cert_chain_pem)],
                                        root_certificates=server_id.ca_pem, require_client_auth=True)
    port = server.add_secure_port(f"127.0.0.1:{_free_port()}", creds)
    server.start()
    try:
        channel_creds = grpc.ssl_channel_credentials(
            client_id.ca_pem, client_id.key_pem, client_id.cert_chain_pem
        )
        for target, authority in ((f"127.0.0.1:{port}", None), (f"localhost:{port}", None),
                                  (f"127.0.0.1:{port}", "auth-svc.default.svc.cluster.local")):
            options = [("grpc.default_authority", authority)] if authority else []
            with grpc.secure_channel(target, channel_creds, options=options) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # CPython's ssl (strict X.509, checks the IP SAN type) accepts the server for 127.0.0.1 too.
        ctx = ssl.create_default_context(cafile=str(mesh_certs.ca_cert))
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.load_cert_chain(*mesh_certs.identity_paths("mesh-client"))
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            peer = tls.getpeercert()
            assert peer is not None
            assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
    finally:
        server.stop(0)


def test_issue_all_issues_every_identity(tmp_path: Path) -> None:
    layout = CertLayout(tmp_path / "c")
    init_ca(layout, "aivo.local")
    assert [c.name for c in issue_all(layout, MESH, 30)] == IDENTITIES
    # The control plane's certificate lives beside the services' (services/control-plane.crt).
    assert layout.issued_service_names() == tuple(sorted([*MESH.service_names, MESH.control_plane.identity]))
    assert layout.issued_client_names() == ("mesh-client",)
