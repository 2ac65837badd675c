"""Who may call what: the mesh.yaml allow-list of one service, and peer identity from mTLS.

Identity follows gRFC A41's principal order: the SPIFFE URI SAN, then the first DNS SAN.
Health checks and reflection are open to every authenticated mesh identity (Envoy, Consul and
test-mesh.py probe with the `mesh-client` certificate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.errors import PkiError
from aivo_mesh.pki import identity_from_cert

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
    if not patterns:
        return True
    return any(method == p or (p.endswith("/") and method.startswith(p)) for p in patterns)


class Authorizer:
    """Decides (caller identity, method) for one service. Decisions are cached: O(1) per call."""

    def __init__(self, mesh: MeshSpec, service: str) -> None:
        self.service = service
        self.trust_prefix = f"spiffe://{mesh.mesh.trust_domain}/"
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


@lru_cache(maxsize=1024)
def _identity_of_pem(pem: bytes) -> str | None:
    try:
        spiffe, dns = identity_from_cert(pem)
    except PkiError:
        return None  # e.g. two URI SANs (SPIFFE forbids it): no identity, so no access
    if spiffe:
        return spiffe
    return dns[0] if dns else None


def peer_identity(auth_context: Mapping[str, list[bytes]]) -> str | None:
    """The caller's identity from grpc's auth_context (None when there is no client certificate)."""
    pems = auth_context.get("x509_pem_cert")
    if not pems:
        return None
    return _identity_of_pem(pems[0])


def tls_version(auth_context: Mapping[str, list[bytes]]) -> str | None:
    v = auth_context.get("ssl_tls_version")
    return v[0].decode() if v else None
