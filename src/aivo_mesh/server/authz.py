"""Who may call what: the mesh.yaml allow-list of one service, and peer identity from mTLS.

A caller's identity is the one SPIFFE ID of its client certificate, once the certificate has passed
the mesh's peer policy (pki/peer.py); a certificate without one (DNS SANs only) has no identity here.
Health checks and reflection are open to every authenticated mesh identity (Envoy, Consul and
test-mesh.py probe with the `mesh-client` certificate).

An Authorizer is never changed: new allow rules make a new one (`MeshServer.update_authorizer`),
so its decision cache cannot outlive the rules it was filled under.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.patterns import covers_any
from aivo_mesh.pki.peer import PeerPolicy

# Methods every authenticated mesh identity may call, whatever the allow-list says.
OPEN_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True, slots=True)
class Rule:
    callers: frozenset[str]  # SPIFFE IDs; "*" = any mesh identity
    methods: tuple[str, ...]  # exact methods or "/pkg.Svc/" prefixes; () = all


def _method_matches(patterns: tuple[str, ...], method: str) -> bool:
    return not patterns or covers_any(patterns, method)  # no patterns: every method


class Authorizer:
    """Decides (caller identity, method) for one service. Decisions are cached: O(1) per call."""

    def __init__(self, mesh: MeshSpec, service: str, rules: Iterable[Rule] | None = None) -> None:
        """mesh.yaml's allow rules of `service`, or `rules` (what a control plane sent)."""
        self.service = service
        self.trust_domain = mesh.mesh.trust_domain
        self.trust_prefix = f"spiffe://{mesh.mesh.trust_domain}/"
        if rules is not None:
            self.rules = tuple(rules)
        else:
            spec = mesh.service(service)
            self.rules = tuple(
                Rule(
                    callers=frozenset(c if c.startswith("spiffe://") or c == "*" else mesh.spiffe_id(c)
                                      for c in rule.from_),
                    methods=rule.methods,
                )
                for rule in spec.allow
            )
        self._cache: dict[tuple[str, str], bool] = {}

    def same_rules(self, other: Authorizer) -> bool:
        """Whether `other` decides every call as this one does (same trust domain and rules)."""
        return (self.service, self.trust_domain, self.rules) == (other.service, other.trust_domain, other.rules)

    def is_mesh_identity(self, identity: str | None) -> bool:
        return identity is not None and identity.startswith(self.trust_prefix)

    def allows(self, identity: str | None, method: str) -> bool:
        key = (identity or "", method)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        decision = self._decide(identity, method)
        if len(self._cache) < 4096:  # bounded: identities x methods is small in a mesh
            self._cache[key] = decision
        return decision

    def _decide(self, identity: str | None, method: str) -> bool:
        if not self.is_mesh_identity(identity):
            return False
        if method.startswith(OPEN_PREFIXES):
            return True
        return any(
            ("*" in r.callers or identity in r.callers) and _method_matches(r.methods, method)
            for r in self.rules
        )


def peer_identity(auth_context: Mapping[str, list[bytes]], policy: PeerPolicy) -> str | None:
    """The caller's SPIFFE ID from grpc's auth_context, or None without a client certificate.

    Raises PeerRefused when the certificate breaks the peer policy. grpc gives the leaf as
    `x509_pem_cert` and the rest of the chain the caller sent as `x509_pem_cert_chain` (one PEM each):
    both are checked, so a SHA-1 intermediate is refused too."""
    leaf = auth_context.get("x509_pem_cert")
    if not leaf:
        return None
    rest = [pem for pem in auth_context.get("x509_pem_cert_chain", ()) if pem != leaf[0]]
    return policy.check_pem(b"".join((leaf[0], *rest)), "client")


class VerifiedSessions:
    """The identities of client connections whose certificate passed `policy`, so that a connection's
    certificate is checked once, as Envoy and Linkerd check it at the handshake, not on every call.

    grpc Python shows a handler its connection only as `auth_context()` (a dict of every TLS property,
    PEMs included: about 4 us, plus the policy lookup, on every call), and names no connection. A
    connection is named here by what a call can show cheaply, all three together:

        the peer address (ip:port)   one live connection at a time; a later one may reuse it
        the session token            a random secret MeshClient makes per mTLS channel and sends only
                                     on it, inside TLS, in the channel's user agent (`SESSION_AGENT`)
        the peer's SANs              `peer_identities()`, from the certificate of this very connection

    A later connection from the same address is a hit only if it sends the same secret and presents a
    certificate with the same names: only the client process that made the token (or a server it sent
    it to, on the same host and holding that identity's key) could. Any other call (no token, another
    address, other names) is checked in full and only then remembered. Only admissions are kept: a
    refused certificate is checked again on every call. An instance belongs to one peer policy; the
    guard starts a new one when the policy changes (a revocation applies to the next call of every
    connection)."""

    MAX_SESSIONS = 4096  # connections churn (max_connection_age): the oldest entry goes first

    __slots__ = ("_identities", "policy")

    def __init__(self, policy: PeerPolicy) -> None:
        self.policy = policy
        self._identities: dict[tuple[str, str, tuple[bytes, ...]], str] = {}

    def get(self, key: tuple[str, str, tuple[bytes, ...]]) -> str | None:
        return self._identities.get(key)

    def add(self, key: tuple[str, str, tuple[bytes, ...]], identity: str) -> None:
        ids = self._identities
        if len(ids) >= self.MAX_SESSIONS:
            del ids[next(iter(ids))]
        ids[key] = identity

    def __len__(self) -> int:
        return len(self._identities)


def tls_version(auth_context: Mapping[str, list[bytes]]) -> str | None:
    v = auth_context.get("ssl_tls_version")
    return v[0].decode() if v else None
