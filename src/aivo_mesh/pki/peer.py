"""The peer-certificate policy: what a certificate must be for this mesh to talk to its holder.

One policy, enforced wherever a certificate is met, in both directions:

    MeshServer      the caller's chain from grpc's auth_context, before the handler runs
    MeshClient      the server's leaf from channelz, before the first call on a new connection
    Envoy sidecars  what their validators can express, plus an allow-list of the keys this policy
                    vetted (render/envoy.py, runtime/sidecar_certs.py)
    load_identity   our own certificate, at start and on every rotation (a certificate we would refuse
                    from a peer is never served)

The rules (`Rule`), each refused with its name so logs and metrics can count them:

- the leaf is not a CA (BasicConstraints CA:FALSE) and has no keyCertSign/cRLSign key usage;
- KeyUsage is present with digitalSignature; ExtendedKeyUsage is present and fits the role
  (serverAuth for a server, clientAuth for a client);
- exactly one URI SAN, a SPIFFE ID in the mesh's trust domain (X.509-SVID), and, where the caller
  knows whom it dials, that identity;
- RSA >= 2048 bits, ECDSA P-256 or P-384, or Ed25519;
- no SHA-1 (or weaker) signature on any certificate of the chain the peer sent;
- not revoked (serial or SPKI pin listed under `certificates.revoked` in mesh.yaml), and one of the
  identity's pins when `certificates.pins` lists some.

Chain building, expiry and the trust anchor are checked by TLS itself (grpc core, BoringSSL) before
any of this runs; this module adds what TLS stacks accept but a mesh must not.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from aivo_mesh.errors import PkiError
from aivo_mesh.pki.crypto import parse_certs, spki_pin, weak_key_reason, weak_signature_reason

Role = Literal["server", "client"]

_EKU = {"server": (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
        "client": (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")}


class Rule(enum.StrEnum):
    """Why a peer certificate was refused: the label of `mesh_peer_certificate_refusals_total`."""

    LEAF_IS_CA = "leaf_is_ca"
    KEY_USAGE = "key_usage"
    EXTENDED_KEY_USAGE = "extended_key_usage"
    URI_SAN_COUNT = "uri_san_count"
    TRUST_DOMAIN = "trust_domain"
    IDENTITY = "identity"
    WEAK_KEY = "weak_key"
    WEAK_SIGNATURE = "weak_signature"
    REVOKED = "revoked"
    PIN = "pin"
    TLS_VERSION = "tls_version"
    UNPARSEABLE = "unparseable"


class PeerRefused(PkiError):
    """A peer certificate broke `rule`; `detail` says how, for the log and the caller."""

    def __init__(self, rule: Rule, detail: str) -> None:
        self.rule = rule
        self.detail = detail
        super().__init__("<peer certificate>", f"{rule}: {detail}")

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}"


def _extension(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None


def leaf_problems(leaf: x509.Certificate, roles: Iterable[Role]) -> list[tuple[Rule, str]]:
    """Every rule a leaf breaks on its own (no trust domain, revocation or pins): for `certs verify`,
    which reports them all, and for `PeerPolicy.check`, which stops at the first."""
    problems: list[tuple[Rule, str]] = []
    bc = _extension(leaf, x509.BasicConstraints)
    if bc is not None and bc.value.ca:  # type: ignore[attr-defined]
        problems.append((Rule.LEAF_IS_CA, "the leaf certificate has CA:TRUE; a workload must not be a CA"))
    ku = _extension(leaf, x509.KeyUsage)
    if ku is None:
        problems.append((Rule.KEY_USAGE, "no KeyUsage extension (a workload needs digitalSignature)"))
    else:
        usage: x509.KeyUsage = ku.value  # type: ignore[assignment]
        if usage.key_cert_sign or usage.crl_sign:
            problems.append((Rule.KEY_USAGE, "the leaf may sign certificates or CRLs (keyCertSign/cRLSign)"))
        if not usage.digital_signature:
            problems.append((Rule.KEY_USAGE, "KeyUsage lacks digitalSignature"))
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    for role in roles:
        oid, label = _EKU[role]
        if eku is None:
            problems.append((Rule.EXTENDED_KEY_USAGE, f"no ExtendedKeyUsage extension (a {role} needs {label})"))
            break
        if oid not in eku.value:  # type: ignore[operator]
            problems.append((Rule.EXTENDED_KEY_USAGE, f"ExtendedKeyUsage lacks {label}: not a {role} certificate"))
    if reason := weak_key_reason(leaf.public_key()):
        problems.append((Rule.WEAK_KEY, reason))
    if reason := weak_signature_reason(leaf):
        problems.append((Rule.WEAK_SIGNATURE, reason))
    return problems


def uris_of(leaf: x509.Certificate) -> list[str]:
    san = _extension(leaf, x509.SubjectAlternativeName)
    if san is None:
        return []
    return [str(u) for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PeerPolicy:
    """The mesh's policy for certificates presented by peers (see the module docstring).

    Immutable: a changed revocation list or pin set is a new policy (`from_mesh`), so a decision
    cached by one policy can never outlive the list it was made under.
    """

    trust_domain: str
    revoked_serials: frozenset[int] = frozenset()
    revoked_spki: frozenset[str] = frozenset()
    pins: Mapping[str, frozenset[str]] = field(default_factory=dict)  # SPIFFE ID -> allowed SPKI pins
    _cache: OrderedDict[tuple[bytes, Role, str | None], str | PeerRefused] = field(
        default_factory=OrderedDict, compare=False, repr=False)

    CACHE_SIZE = 1024

    @classmethod
    def from_mesh(cls, mesh: object) -> PeerPolicy:
        """The policy mesh.yaml describes (`mesh.trust_domain`, `certificates.revoked`/`pins`)."""
        from aivo_mesh.config.model import MeshSpec

        assert isinstance(mesh, MeshSpec)
        certs = mesh.certificates
        return cls(
            trust_domain=mesh.mesh.trust_domain,
            revoked_serials=frozenset(int(r.serial, 16) for r in certs.revoked if r.serial is not None),
            revoked_spki=frozenset(r.spki for r in certs.revoked if r.spki is not None),
            pins={(name if name.startswith("spiffe://") else mesh.spiffe_id(name)): frozenset(p)
                  for name, p in certs.pins.items()},
        )

    @property
    def trust_prefix(self) -> str:
        return f"spiffe://{self.trust_domain}/"

    def check(self, chain: Sequence[x509.Certificate], role: Role, expect: str | None = None) -> str:
        """The peer's SPIFFE ID if `chain` (leaf first, as the peer sent it) passes; else PeerRefused.

        `role` is what the peer is to us (a client calling our server, or the server we dial);
        `expect` the identity we meant to reach, when we know it."""
        leaf = chain[0]
        problems = leaf_problems(leaf, (role,))
        if problems:
            raise PeerRefused(*problems[0])
        for extra in chain[1:]:
            if reason := weak_signature_reason(extra):
                raise PeerRefused(Rule.WEAK_SIGNATURE, f"chain certificate {extra.subject.rfc4514_string()}: "
                                                       f"{reason}")
        uris = uris_of(leaf)
        if len(uris) != 1:
            found = ", ".join(uris) or "none"
            raise PeerRefused(Rule.URI_SAN_COUNT, f"expected exactly one URI SAN (a SPIFFE ID), found "
                                                  f"{len(uris)}: {found}")
        identity = uris[0]
        if not identity.startswith(self.trust_prefix):
            raise PeerRefused(Rule.TRUST_DOMAIN, f"{identity} is not in the mesh's trust domain "
                                                 f"{self.trust_domain}")
        if expect is not None and identity != expect:
            raise PeerRefused(Rule.IDENTITY, f"the certificate is {identity}, expected {expect}")
        if leaf.serial_number in self.revoked_serials:
            raise PeerRefused(Rule.REVOKED, f"serial {leaf.serial_number:x} of {identity} is revoked "
                                            "(certificates.revoked)")
        pin = spki_pin(leaf)
        if pin in self.revoked_spki:
            raise PeerRefused(Rule.REVOKED, f"the key of {identity} (SPKI {pin}) is revoked (certificates.revoked)")
        allowed = self.pins.get(identity)
        if allowed is not None and pin not in allowed:
            raise PeerRefused(Rule.PIN, f"the key of {identity} (SPKI {pin}) is not one of its pins "
                                        "(certificates.pins)")
        return identity

    def check_pem(self, pem: bytes, role: Role, expect: str | None = None) -> str:
        """`check` on PEM bytes (grpc's `x509_pem_cert_chain`), cached: the same connection's calls and
        the same peer's connections cost one dictionary lookup after the first."""
        key = (pem, role, expect)
        hit = self._cache.get(key)
        if hit is None:
            try:
                hit = self.check(parse_certs(pem, "<peer certificate>"), role, expect)
            except PeerRefused as exc:
                hit = exc
            except PkiError as exc:
                hit = PeerRefused(Rule.UNPARSEABLE, exc.reason)
            self._cache[key] = hit
            if len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        if isinstance(hit, PeerRefused):
            raise hit
        return hit

    def vetted(self, leaf: x509.Certificate, roles: Iterable[Role] = ("server", "client")) -> PeerRefused | None:
        """Why this mesh would refuse `leaf` from a peer in any of `roles`, or None: what a certificate
        must pass before it is served or its key published to Envoy's allow-list."""
        try:
            for role in roles:
                self.check([leaf], role)
        except PeerRefused as exc:
            return exc
        return None
