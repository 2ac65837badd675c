"""The peer-certificate policy (pki/peer.py) on its own: each rule refused by name, on certificates the
mesh's own issuing CA signed (tests/rogue_certs.py), and what mesh.yaml's `certificates` block adds.

The planes that enforce it (MeshServer, MeshClient, Envoy) are tested in test_peer_matrix.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from rogue_certs import mint, needs_openssl

from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.errors import ConfigError
from aivo_mesh.pki import CertLayout, PeerPolicy, PeerRefused, Rule, spki_pin

ROOT = Path(__file__).resolve().parents[1]
AUTH = "spiffe://aivo.local/ns/default/sa/auth-svc"


def _chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _refusal(policy: PeerPolicy, chain: list[x509.Certificate], role: str = "client",
             expect: str | None = None) -> PeerRefused:
    with pytest.raises(PeerRefused) as exc:
        policy.check(chain, role, expect)  # type: ignore[arg-type]
    return exc.value


def test_the_mesh_own_certificates_pass_in_both_roles(mesh_certs: CertLayout, mesh: MeshSpec) -> None:
    policy = PeerPolicy.from_mesh(mesh)
    for name in (*mesh.service_names, *mesh.mesh.clients):
        chain = _chain(mesh_certs.identity_paths(name)[0])
        assert policy.check(chain, "client") == mesh.spiffe_id(name)
        assert policy.check(chain, "server", expect=mesh.spiffe_id(name)) == mesh.spiffe_id(name)


@needs_openssl
@pytest.mark.parametrize(("case", "kwargs", "rule", "phrase"), [
    ("rsa-1024", {"key": "rsa:1024"}, Rule.WEAK_KEY, "1024 bits"),
    ("sha1", {"digest": "sha1"}, Rule.WEAK_SIGNATURE, "SHA1"),
    ("ca-true", {"ca": True}, Rule.LEAF_IS_CA, "CA:TRUE"),
    ("two-uris", {"uris": [AUTH, "spiffe://aivo.local/ns/default/sa/admin"]}, Rule.URI_SAN_COUNT, "found 2"),
    ("no-uri", {"uris": []}, Rule.URI_SAN_COUNT, "found 0"),
    ("foreign-td", {"uris": ["spiffe://evil.example/ns/default/sa/auth-svc"]}, Rule.TRUST_DOMAIN, "evil.example"),
    ("no-server-auth", {"eku": ["clientAuth"]}, Rule.EXTENDED_KEY_USAGE, "serverAuth"),
    ("no-eku", {"eku": []}, Rule.EXTENDED_KEY_USAGE, "no ExtendedKeyUsage"),
])
def test_each_rule_is_refused_by_name(mesh_certs: CertLayout, mesh: MeshSpec, tmp_path: Path, case: str,
                                      kwargs: dict[str, object], rule: Rule, phrase: str) -> None:
    cert, _ = mint(mesh_certs, mesh, "auth-svc", tmp_path / case, **kwargs)  # type: ignore[arg-type]
    refused = _refusal(PeerPolicy.from_mesh(mesh), _chain(cert), role="server", expect=AUTH)
    assert refused.rule == rule
    assert phrase in refused.detail
    assert str(rule) in str(refused)


@needs_openssl
def test_a_client_certificate_needs_client_auth_and_a_server_one_server_auth(
        mesh_certs: CertLayout, mesh: MeshSpec, tmp_path: Path) -> None:
    policy = PeerPolicy.from_mesh(mesh)
    server_only, _ = mint(mesh_certs, mesh, "auth-svc", tmp_path / "s", eku=["serverAuth"])
    assert policy.check(_chain(server_only), "server") == AUTH
    assert _refusal(policy, _chain(server_only), "client").rule == Rule.EXTENDED_KEY_USAGE


def test_the_server_we_dial_must_be_the_identity_we_meant(mesh_certs: CertLayout, mesh: MeshSpec) -> None:
    learner = _chain(mesh_certs.identity_paths("learner-svc")[0])
    refused = _refusal(PeerPolicy.from_mesh(mesh), learner, "server", expect=AUTH)
    assert refused.rule == Rule.IDENTITY
    assert "learner-svc" in refused.detail


def _with_certificates(mesh: MeshSpec, block: str) -> MeshSpec:
    text = (ROOT / "mesh.yaml").read_text() + "\ncertificates:\n" + block
    return parse_mesh(text, "mesh.yaml")


def test_revoked_serials_and_keys_are_refused(mesh_certs: CertLayout, mesh: MeshSpec) -> None:
    auth = _chain(mesh_certs.identity_paths("auth-svc")[0])
    learner = _chain(mesh_certs.identity_paths("learner-svc")[0])
    serial = f"{auth[0].serial_number:X}"  # upper case, as openssl prints it: normalised
    by_serial = PeerPolicy.from_mesh(_with_certificates(mesh, f'  revoked:\n    - serial: "{serial}"\n'))
    assert _refusal(by_serial, auth).rule == Rule.REVOKED
    assert by_serial.check(learner, "client")  # only that certificate
    by_key = PeerPolicy.from_mesh(_with_certificates(
        mesh, f'  revoked:\n    - spki: "{spki_pin(learner[0])}"\n      note: key leaked\n'))
    assert _refusal(by_key, learner).rule == Rule.REVOKED
    assert by_key.check(auth, "client") == AUTH


def test_pins_restrict_an_identity_to_its_keys(mesh_certs: CertLayout, mesh: MeshSpec) -> None:
    auth = _chain(mesh_certs.identity_paths("auth-svc")[0])
    learner = _chain(mesh_certs.identity_paths("learner-svc")[0])
    pinned = PeerPolicy.from_mesh(_with_certificates(
        mesh, f'  pins:\n    auth-svc: ["{spki_pin(learner[0])}"]\n'))
    assert _refusal(pinned, auth).rule == Rule.PIN
    assert pinned.check(learner, "client")  # identities without pins are not restricted


@pytest.mark.parametrize(("block", "path", "phrase"), [
    ('  revoked:\n    - serial: 1234\n', "certificates.revoked[0].serial", "hex string in quotes"),
    ('  revoked:\n    - serial: "xyz"\n', "certificates.revoked[0].serial", "hex certificate serial"),
    ('  revoked:\n    - note: forgot\n', "certificates.revoked[0]", "`serial` or `spki`"),
    ('  revoked:\n    - spki: "abc="\n', "certificates.revoked[0].spki", "SPKI pin"),
    ('  pins:\n    nobody: []\n', "certificates.pins.nobody", "unknown identity"),
])
def test_a_bad_certificates_block_is_a_located_config_error(mesh: MeshSpec, block: str, path: str,
                                                            phrase: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _with_certificates(mesh, block)
    text = str(exc.value)
    assert path in text and phrase in text, text


def test_decisions_on_pem_are_cached_and_refusals_too(mesh_certs: CertLayout, mesh: MeshSpec) -> None:
    policy = PeerPolicy.from_mesh(mesh)
    pem = mesh_certs.identity_paths("auth-svc")[0].read_bytes()
    assert policy.check_pem(pem, "client") == AUTH
    assert policy.check_pem(pem, "client") == AUTH
    with pytest.raises(PeerRefused) as exc:
        policy.check_pem(b"not a certificate", "client")
    assert exc.value.rule == Rule.UNPARSEABLE
    assert len(policy._cache) == 2


@needs_openssl
def test_an_identity_without_the_eku_of_its_role_is_refused_at_start(mesh_certs: CertLayout, mesh: MeshSpec,
                                                                     tmp_path: Path) -> None:
    from aivo_mesh import MeshClient, MeshConfig, MeshServer
    from aivo_mesh.errors import PkiError

    cert, key = mint(mesh_certs, mesh, "auth-svc", tmp_path / "client-only", eku=["clientAuth"])
    with pytest.raises(PkiError) as exc:  # every client would refuse it: refused before the port is bound
        MeshServer(mesh, "auth-svc", cert=cert, key=key, ca=mesh_certs.ca_cert, port=0)
    assert exc.value.file == str(cert) and "serverAuth" in exc.value.reason
    cert, key = mint(mesh_certs, mesh, "learner-svc", tmp_path / "server-only", eku=["serverAuth"])
    with pytest.raises(PkiError) as exc:
        MeshClient(MeshConfig(service_name="learner-svc", ca_cert_path=mesh_certs.ca_cert, client_cert_path=cert,
                              client_key_path=key, mesh=mesh))
    assert exc.value.file == str(cert) and "clientAuth" in exc.value.reason
