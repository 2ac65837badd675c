"""The mesh PKI: a root + issuing CA, SPIFFE X.509-SVID leaves per service, and their checks.

    layout   CertLayout: where every file lives (see its docstring for the directory tree)
    params   key types and lifetimes (no cryptography: the CLI's options are built from them)
    issue    init_ca, issue_leaf, issue_all, rotate
    verify   verify_layout / inspect_layout -> CertReport per certificate
    load     load_identity -> Identity (for grpc, before binding)
    peer     PeerPolicy: what a peer's certificate must be (both planes, both directions)
    store    atomic 0600/0644 writes

Every function raises `aivo_mesh.errors.PkiError(file, reason)` for bad input; nothing here prints.

Importing this package loads only `layout` and `params`: the names of the other modules are imported
from them on first use (`from aivo_mesh.pki import init_ca` works as ever), so that a state directory's
paths or a `meshctl` command's options do not load `cryptography`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aivo_mesh._lazy import lazy_getattr
from aivo_mesh.pki.layout import CertLayout
from aivo_mesh.pki.params import DEFAULT_KEY_TYPE, KEY_TYPES, LEAF_VALID_DAYS, MIN_RSA_BITS, ROOT_VALID_DAYS, KeyType

if TYPE_CHECKING:
    from aivo_mesh.pki.chain import chain_problem
    from aivo_mesh.pki.crypto import cert_sha256, parse_key_type, spki_pin
    from aivo_mesh.pki.issue import (
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
    from aivo_mesh.pki.load import Identity, file_signature, load_identity
    from aivo_mesh.pki.peer import PeerPolicy, PeerRefused, Rule
    from aivo_mesh.pki.verify import CertReport, inspect_layout, verify_identity, verify_layout

# name -> the module (of this package) that defines it, imported on first use
_LAZY = {
    "chain_problem": "chain",
    **dict.fromkeys(("cert_sha256", "parse_key_type", "spki_pin"), "crypto"),
    **dict.fromkeys(("CaInfo", "IssuedCert", "Issuer", "check_identity", "dns_names_for", "expected_sans", "init_ca",
                     "issue_all", "issue_leaf", "known_identities", "load_issuer", "rotate"), "issue"),
    **dict.fromkeys(("Identity", "file_signature", "load_identity"), "load"),
    **dict.fromkeys(("PeerPolicy", "PeerRefused", "Rule"), "peer"),
    **dict.fromkeys(("CertReport", "inspect_layout", "verify_identity", "verify_layout"), "verify"),
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


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
