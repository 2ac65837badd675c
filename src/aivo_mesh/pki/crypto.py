"""Small pure helpers over `cryptography`: key types, PEM parsing, pins and strength checks."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from datetime import UTC, datetime
from typing import cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from aivo_mesh.errors import PkiError
from aivo_mesh.pki.params import DEFAULT_KEY_TYPE as DEFAULT_KEY_TYPE  # re-exported: defined without cryptography
from aivo_mesh.pki.params import KEY_TYPES as KEY_TYPES
from aivo_mesh.pki.params import MIN_RSA_BITS as MIN_RSA_BITS
from aivo_mesh.pki.params import KeyType as KeyType

# Signature hashes that are refused wherever a certificate is loaded or verified.
WEAK_HASHES: tuple[str, ...] = ("sha1", "md5", "md2", "md4")

PrivateKey = CertificateIssuerPrivateKeyTypes


def parse_key_type(value: str) -> KeyType:
    """'ec-p256' -> 'ec-p256'; refuses weak or unknown key types with a message saying what is allowed."""
    v = value.strip().lower()
    if v in KEY_TYPES:
        return cast(KeyType, v)
    if v.startswith("rsa-") and v[4:].isdigit() and int(v[4:]) < MIN_RSA_BITS:
        raise PkiError(
            "--key-type",
            f"{value}: RSA keys shorter than {MIN_RSA_BITS} bits are refused; "
            f"use one of {', '.join(KEY_TYPES)}",
        )
    raise PkiError("--key-type", f"unknown key type {value!r}: expected one of {', '.join(KEY_TYPES)}")


def generate_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    bits = int(key_type.split("-")[1])
    if bits < MIN_RSA_BITS:  # unreachable through parse_key_type; belt and braces
        raise PkiError("--key-type", f"RSA keys shorter than {MIN_RSA_BITS} bits are refused")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_type_of(key: object) -> KeyType | None:
    """The KeyType of a private or public key, or None if it is not one we issue."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name)  # type: ignore[return-value]
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        name = f"rsa-{key.key_size}"
        return cast(KeyType, name) if name in KEY_TYPES else None
    return None


def key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (protected by 0600 file permissions)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def spki_pin(cert: x509.Certificate) -> str:
    """base64(SHA-256(DER SubjectPublicKeyInfo)): Envoy's `verify_certificate_spki`."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def cert_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the DER certificate: Envoy's `verify_certificate_hash`."""
    return cert.fingerprint(hashes.SHA256()).hex()


def now_utc() -> datetime:
    return datetime.now(UTC)


def parse_certs(data: bytes, file: str, what: str = "certificate") -> list[x509.Certificate]:
    """Every certificate of a PEM file, or PkiError(file) for empty, garbage or truncated input."""
    if not data.strip():
        raise PkiError(file, f"{what} file is empty")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise PkiError(file, f"not a PEM {what} (no '-----BEGIN CERTIFICATE-----' block)")
    if data.count(b"-----BEGIN CERTIFICATE-----") != data.count(b"-----END CERTIFICATE-----"):
        raise PkiError(file, f"truncated PEM {what} (BEGIN without END)")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(file, f"malformed PEM {what}: {exc}") from None
    if not certs:
        raise PkiError(file, f"no {what} found")
    return certs


def parse_private_key(data: bytes, file: str) -> PrivateKey:
    """The private key of a PEM file, or PkiError(file) for empty/garbage/encrypted/unsupported keys."""
    if not data.strip():
        raise PkiError(file, "private key file is empty")
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise PkiError(file, "not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' block)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(file, "private key is encrypted; an unencrypted PKCS#8 key is expected") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(file, f"malformed PEM private key: {exc}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise PkiError(file, "Ed25519/Ed448 keys are not supported by gRPC TLS; use EC P-256")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(file, f"unsupported private key type {type(key).__name__}")
    return key


def public_keys_equal(a: object, b: object) -> bool:
    def der(k: object) -> bytes:
        return k.public_bytes(  # type: ignore[attr-defined,no-any-return]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    try:
        return der(a) == der(b)
    except (AttributeError, ValueError):
        return False


def key_matches_cert(key: PrivateKey, cert: x509.Certificate) -> bool:
    return public_keys_equal(key.public_key(), cert.public_key())


def weak_key_reason(public_key: object) -> str | None:
    """Why a public key is outside the mesh's key policy, or None. Accepted: RSA >= 2048 bits, ECDSA on
    P-256 or P-384, Ed25519 (from peers; our own keys are EC or RSA, which grpc's TLS can load)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            return f"RSA key of {public_key.key_size} bits is too weak (minimum {MIN_RSA_BITS})"
        return None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            return f"EC key on {public_key.curve.name}: only P-256 and P-384 are accepted"
        return None
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return None
    return f"unsupported public key type {type(public_key).__name__}"


def weak_signature_reason(cert: x509.Certificate) -> str | None:
    """Why a certificate's signature algorithm is refused (SHA-1, MD5), or None."""
    oid_name = getattr(cert.signature_algorithm_oid, "_name", "") or ""
    try:
        algo = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return f"unsupported signature algorithm {oid_name or cert.signature_algorithm_oid.dotted_string}"
    if algo is not None and algo.name.lower() in WEAK_HASHES:
        return f"certificate is signed with {algo.name.upper()} ({oid_name}); SHA-256 or better is required"
    return None


def san_names(cert: x509.Certificate) -> tuple[list[str], list[str], list[str], list[str]]:
    """(DNS names, IP addresses as strings, URIs, other SAN entries rendered) of a certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], [], [], []
    dns = [str(v) for v in san.get_values_for_type(x509.DNSName)]
    ips = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    uris = [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    other = [
        repr(g) for g in san
        if not isinstance(g, x509.DNSName | x509.IPAddress | x509.UniformResourceIdentifier)
    ]
    return dns, ips, uris, other


def render_sans(cert: x509.Certificate) -> list[str]:
    """SANs as `DNS:x`, `IP:1.2.3.4`, `URI:spiffe://...` (openssl's notation)."""
    dns, ips, uris, other = san_names(cert)
    return [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips] + [f"URI:{u}" for u in uris] + other


def looks_like_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def is_ca(cert: x509.Certificate) -> bool:
    bc = basic_constraints(cert)
    return bc is not None and bc.ca


def subject_str(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()
