"""The mesh PKI: a root + issuing CA, SPIFFE X.509-SVID leaves per service, and their checks.

    layout   CertLayout: where every file lives (see its docstring for the directory tree)
    issue    init_ca, issue_leaf, issue_all, rotate
    verify   verify_layout / inspect_layout -> CertReport per certificate
    load     load_identity -> Identity (for grpc, before binding)
    peer     PeerPolicy: what a peer's certificate must be (both planes, both directions)
    store    atomic 0600/0644 writes

Every function raises `aivo_mesh.errors.PkiError(file, reason)` for bad input; nothing here prints.
"""

from aivo_mesh.pki.chain import chain_problem
from aivo_mesh.pki.crypto import (
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    MIN_RSA_BITS,
    KeyType,
    cert_sha256,
    parse_key_type,
    spki_pin,
)
from aivo_mesh.pki.issue import (
    LEAF_VALID_DAYS,
    ROOT_VALID_DAYS,
    CaInfo,
    IssuedCert,
    Issuer,
    check_identity,
    dns_names_for,
    expected_sans,
    init_ca,
    issue_all,
    issue_leaf,
    known_identities,
    load_issuer,
    rotate,
)
from aivo_mesh.pki.layout import CertLayout
from aivo_mesh.pki.load import Identity, file_signature, load_identity
from aivo_mesh.pki.peer import PeerPolicy, PeerRefused, Rule
from aivo_mesh.pki.verify import CertReport, inspect_layout, verify_identity, verify_layout

__all__ = [
    "DEFAULT_KEY_TYPE",
    "KEY_TYPES",
    "LEAF_VALID_DAYS",
    "MIN_RSA_BITS",
    "ROOT_VALID_DAYS",
    "CaInfo",
    "CertLayout",
    "CertReport",
    "Identity",
    "IssuedCert",
    "Issuer",
    "KeyType",
    "PeerPolicy",
    "PeerRefused",
    "Rule",
    "cert_sha256",
    "chain_problem",
    "check_identity",
    "dns_names_for",
    "expected_sans",
    "file_signature",
    "init_ca",
    "inspect_layout",
    "issue_all",
    "issue_leaf",
    "known_identities",
    "load_identity",
    "load_issuer",
    "parse_key_type",
    "rotate",
    "spki_pin",
    "verify_identity",
    "verify_layout",
]
