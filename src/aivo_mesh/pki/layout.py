"""Where the mesh PKI lives on disk.

Everything is relative to one certs directory (``meshctl certs ... --certs-dir``, default ``./certs``)::

    certs/
    ├── ca/                       0700
    │   ├── root.crt              root CA: EC P-256, 10y, CA:TRUE pathlen 1 (self-signed)
    │   ├── root-key.pem          root key: may be moved offline after `certs init`
    │   ├── intermediate.crt      issuing CA alone: CA:TRUE pathlen 0, signed by the root
    │   ├── ca-key.pem            issuing CA key (the only CA key needed online, to issue/rotate)
    │   └── ca.crt                TRUST BUNDLE: intermediate, then root (PEM, 2 certs)
    ├── services/
    │   ├── <svc>.crt             leaf, then intermediate (the chain a server/client sends)
    │   └── <svc>-key.pem         leaf key, PKCS#8, 0600
    ├── mesh-client.crt           leaf + intermediate for the `mesh-client` identity
    └── mesh-client-key.pem       0600

Why ``ca.crt`` holds both CA certs: ``openssl verify -CAfile certs/ca/ca.crt certs/services/x.crt``
reads only the first certificate of ``x.crt``, so the intermediate must be in the CA file; gRPC
(``root_certificates=ca.crt``, ``certificate_chain=x.crt``) works with either. The first certificate of
``ca.crt`` is the issuing CA, i.e. the certificate that matches ``ca-key.pem``. During a CA rollover
``ca.crt`` may hold more certificates (old + new); every consumer treats it as a set of anchors.

Properties: `ca_cert` (= `ca_bundle`) is ``ca/ca.crt``, `ca_key` is ``ca/ca-key.pem``, `issuer_cert` is
``ca/intermediate.crt``, `root_cert`/`root_key` are the root files; `identity_paths(name)` gives
``(chain, key)`` of a service or client identity.

``mesh-client`` (the identity of operators, health checkers and test tools) lives at the top level of the
directory; every other identity (services, and any further client identity listed in mesh.yaml's
``mesh.clients``) lives under ``services/``. Paths therefore never depend on mesh.yaml.

The same layout answers the paths a container sees, for the renderers: ``CertLayout(Path(IMAGE_CERTS_DIR))``
is the certs directory mounted in the aivo-mesh image, ``CertLayout(Path("/etc/envoy/certs"))`` in an Envoy
sidecar, and ``CertLayout(Path())`` gives paths relative to the directory (a Kubernetes Secret's items).
Renderers spell them with ``as_posix()``, so a rendering is the same on every host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Identities whose files live at the top of the certs directory instead of under services/.
TOP_LEVEL_IDENTITIES: tuple[str, ...] = ("mesh-client",)
# Where the aivo-mesh image (Docker Compose, Kubernetes) has the certs directory mounted, read-only.
IMAGE_CERTS_DIR = "/etc/aivo-mesh/certs"


@dataclass(frozen=True)
class CertLayout:
    """The file layout of one certs directory. Pure path arithmetic: nothing is read or created."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # --- CA -------------------------------------------------------------------------------------
    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        """`ca/ca.crt`, the trust bundle (issuing CA first, then root): what every verifier trusts.

        Pass it as grpc `root_certificates`, Envoy `trusted_ca`, `openssl verify -CAfile`.
        """
        return self.ca_dir / "ca.crt"

    @property
    def ca_bundle(self) -> Path:
        """Alias of `ca_cert` (`ca/ca.crt`)."""
        return self.ca_cert

    @property
    def ca_key(self) -> Path:
        """Key of the issuing (intermediate) CA, which signs every leaf."""
        return self.ca_dir / "ca-key.pem"

    @property
    def issuer_cert(self) -> Path:
        """The issuing (intermediate) CA certificate alone (`ca/intermediate.crt`)."""
        return self.ca_dir / "intermediate.crt"

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root.crt"

    @property
    def root_key(self) -> Path:
        """Root key; not needed for issuing leaves, so it may be kept offline."""
        return self.ca_dir / "root-key.pem"

    @property
    def crl(self) -> Path:
        """`ca/crl.pem`: mesh.yaml's revoked serials, signed by the issuing CA (for Envoy; see pki/revoke.py)."""
        return self.ca_dir / "crl.pem"

    def ca_files(self) -> tuple[Path, ...]:
        return (self.root_cert, self.root_key, self.issuer_cert, self.ca_key, self.ca_cert)

    # --- leaves ---------------------------------------------------------------------------------
    @property
    def services_dir(self) -> Path:
        return self.root / "services"

    def service_paths(self, name: str) -> tuple[Path, Path]:
        return self.services_dir / f"{name}.crt", self.services_dir / f"{name}-key.pem"

    def client_paths(self, name: str = "mesh-client") -> tuple[Path, Path]:
        return self.root / f"{name}.crt", self.root / f"{name}-key.pem"

    def identity_paths(self, name: str) -> tuple[Path, Path]:
        """(certificate chain, private key) of a service or client identity (`mesh-client`)."""
        _check_name(name)
        if name in TOP_LEVEL_IDENTITIES:
            return self.client_paths(name)
        return self.service_paths(name)

    def issued_service_names(self) -> tuple[str, ...]:
        """Services that have a certificate file on disk, sorted."""
        if not self.services_dir.is_dir():
            return ()
        return tuple(sorted(p.name[: -len(".crt")] for p in self.services_dir.glob("*.crt")))

    def issued_client_names(self) -> tuple[str, ...]:
        """Top-level identities (`mesh-client`) that have a certificate file on disk."""
        return tuple(c for c in TOP_LEVEL_IDENTITIES if self.client_paths(c)[0].exists())


def _check_name(name: str) -> None:
    # Names come from mesh.yaml (DNS labels), but never let one escape the directory.
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"not a valid identity name: {name!r}")
