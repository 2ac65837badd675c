"""Loading a workload identity (cert chain, key, CA bundle) for grpc, BEFORE any port is bound.

grpcio reports bad credentials as "Failed to bind to address" (server) or UNAVAILABLE (client), and
accepts weak ones (RSA-1024, SHA-1, two URI SANs, CA:TRUE leaves, world-readable keys). So every
server and client parses its files here first; each problem is a `PkiError(file, reason)` that
names the offending file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509

from aivo_mesh.errors import PkiError
from aivo_mesh.pki import store
from aivo_mesh.pki.chain import chain_problem
from aivo_mesh.pki.crypto import (
    key_matches_cert,
    now_utc,
    parse_certs,
    parse_private_key,
    san_names,
    spki_pin,
    subject_str,
    weak_key_reason,
    weak_signature_reason,
)
from aivo_mesh.pki.peer import Role, leaf_problems

# (mtime_ns, size, inode, mode); all -1 when missing. The mode counts: a key refused for its
# permissions is fixed with `chmod 600`, which changes neither mtime, size nor inode.
FileSignature = tuple[int, int, int, int]


@dataclass(frozen=True)
class Identity:
    """A validated identity, ready for `grpc.ssl_server_credentials` / `grpc.ssl_channel_credentials`.

    `cert_chain_pem` is the file as read (leaf + intermediate); `ca_pem` the trust bundle.
    """

    cert_chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    ca_pem: bytes = field(repr=False)
    spiffe_id: str | None
    dns_names: tuple[str, ...]
    not_after: datetime
    serial: int
    spki_pin: str
    cert_path: Path
    key_path: Path
    ca_path: Path
    # `file_signature` of the three files, taken just before they were read.
    loaded_signature: tuple[FileSignature, ...] = field(default=(), repr=False, compare=False)

    def mtime_signature(self) -> tuple[FileSignature, ...]:
        """The files' signature as they were when this identity was loaded: compare it with
        `signature_of(paths)` to notice a rotation cheaply (an atomic replace changes the inode)."""
        return self.loaded_signature

    @staticmethod
    def signature_of(
        cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str], ca_path: str | os.PathLike[str]
    ) -> tuple[FileSignature, ...]:
        """What `mtime_signature()` would return for these paths, without loading anything."""
        return file_signature(Path(cert_path), Path(key_path), Path(ca_path))

    def seconds_left(self, now: datetime | None = None) -> float:
        """Seconds until the leaf expires (negative once expired)."""
        return (self.not_after - (now or now_utc())).total_seconds()


def file_signature(*paths: Path) -> tuple[FileSignature, ...]:
    out: list[FileSignature] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append((-1, -1, -1, -1))
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode))
    return tuple(out)


def _check_leaf(leaf: x509.Certificate, cert_file: str, now: datetime, roles: Iterable[Role]) -> None:
    # The peer policy's rules first: a certificate we would refuse from a peer is never served.
    problems = leaf_problems(leaf, roles)
    if problems:
        rule, detail = problems[0]
        raise PkiError(cert_file, f"{detail} ({rule}; subject {subject_str(leaf)})")
    _dns, _ips, uris, _other = san_names(leaf)
    if len(uris) > 1:
        raise PkiError(cert_file, f"more than one URI SAN ({', '.join(uris)}); an X.509-SVID has exactly one")
    if now < leaf.not_valid_before_utc:
        raise PkiError(
            cert_file,
            f"certificate is not valid yet (notBefore {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z)",
        )
    if now >= leaf.not_valid_after_utc:
        raise PkiError(cert_file, f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z")


def load_identity(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    ca_path: str | os.PathLike[str],
    *,
    now: datetime | None = None,
    expect_spiffe_id: str | None = None,
    roles: Iterable[Role] = (),
) -> Identity:
    """Read and validate an identity; PkiError(file, reason) names the file at fault.

    Checked: files exist and parse (empty, garbage, truncated PEM); key not accessible by group/others;
    no RSA < 2048 / SHA-1 anywhere; leaf is not a CA and has at most one URI SAN; leaf inside its validity
    window; key matches the leaf; leaf (+ the intermediates in its file) chains to the CA bundle; and,
    given `expect_spiffe_id`, that the leaf is that identity (auth-svc started with learner-svc's
    certificate passes every TLS check and is then authorized as learner-svc). The leaf must also pass
    the peer policy's own rules (pki/peer.py), with ExtendedKeyUsage fitting each of `roles` (a server
    certificate without serverAuth would be refused by every client).
    """
    cert_p, key_p, ca_p = Path(cert_path), Path(key_path), Path(ca_path)
    cert_f, key_f, ca_f = str(cert_p), str(key_p), str(ca_p)
    now = now or now_utc()
    # Before reading: a rotation racing with this load then shows up as a change next time.
    signature = file_signature(cert_p, key_p, ca_p)

    chain_pem = store.read_bytes(cert_p, "certificate")
    key_data = store.read_bytes(key_p, "private key")
    ca_pem = store.read_bytes(ca_p, "CA bundle")

    perm = store.key_permission_problem(key_p)
    if perm is not None:
        raise PkiError(key_f, perm)

    chain = parse_certs(chain_pem, cert_f, "certificate")
    anchors = parse_certs(ca_pem, ca_f, "CA bundle")
    key = parse_private_key(key_data, key_f)

    leaf = chain[0]
    _check_leaf(leaf, cert_f, now, roles)
    reason = weak_key_reason(key.public_key())
    if reason:
        raise PkiError(key_f, reason)
    for extra in chain[1:]:
        reason = weak_signature_reason(extra) or weak_key_reason(extra.public_key())
        if reason:
            raise PkiError(cert_f, f"chain certificate {subject_str(extra)}: {reason}")
    for anchor in anchors:
        reason = weak_key_reason(anchor.public_key())
        if reason:
            raise PkiError(ca_f, f"{subject_str(anchor)}: {reason}")
    if not key_matches_cert(key, leaf):
        raise PkiError(key_f, f"private key does not match the certificate in {cert_f}")

    problem = chain_problem(leaf, chain[1:], anchors, now)
    if problem is not None:
        raise PkiError(cert_f, f"{problem} ({ca_f}); the certificate is not signed by this mesh CA")

    dns, _ips, uris, _other = san_names(leaf)
    spiffe = uris[0] if uris and uris[0].startswith("spiffe://") else None
    if expect_spiffe_id is not None and spiffe != expect_spiffe_id:
        raise PkiError(cert_f, f"the certificate is {spiffe or 'without a SPIFFE ID'}, expected "
                               f"{expect_spiffe_id} (another identity's files?)")
    return Identity(
        cert_chain_pem=chain_pem,
        key_pem=key_data,
        ca_pem=ca_pem,
        spiffe_id=spiffe,
        dns_names=tuple(dns),
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
        spki_pin=spki_pin(leaf),
        cert_path=cert_p,
        key_path=key_p,
        ca_path=ca_p,
        loaded_signature=signature,
    )
