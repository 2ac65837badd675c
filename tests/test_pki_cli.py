"""`meshctl certs ...` exit codes and output; infra/mesh/scripts/generate-certs.sh (both argument forms)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from binaries import optional
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aivo_mesh.cli import main
from aivo_mesh.config import load_mesh
from aivo_mesh.pki import CertLayout
from aivo_mesh.pki.issue import build_leaf, load_issuer

ROOT = Path(__file__).resolve().parents[1]
MESH_FILE = ROOT / "mesh.yaml"
SCRIPT = ROOT / "infra/mesh/scripts/generate-certs.sh"
IDENTITIES = ["auth-svc", "learner-svc", "event-collector-svc", "analytics-svc", "mesh-client", "control-plane"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def certs(mesh_certs: CertLayout, tmp_path: Path) -> CertLayout:
    shutil.copytree(mesh_certs.root, tmp_path / "certs")
    return CertLayout(tmp_path / "certs")


def test_init_issue_verify_inspect_rotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = str(tmp_path / "certs")
    cfg = ("--config", str(MESH_FILE))
    code, out, _ = _run(capsys, "certs", "init", "--certs-dir", out_dir, *cfg)
    assert code == 0
    assert "aivo.local" in out
    code, out, _ = _run(capsys, "certs", "issue", "--all", "--certs-dir", out_dir, "--valid-days", "30",
                        *cfg)
    assert code == 0
    for name in IDENTITIES:
        assert name in out
    code, out, _ = _run(capsys, "certs", "verify", "--certs-dir", out_dir, *cfg)
    assert code == 0, out
    assert "all 8 certificates OK" in out
    layout = CertLayout(Path(out_dir))
    leaf = x509.load_pem_x509_certificates(layout.identity_paths("auth-svc")[0].read_bytes())[0]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 30

    code, out, _ = _run(capsys, "certs", "verify", "--certs-dir", out_dir, "--json", *cfg)
    data = json.loads(out)
    assert code == 0
    assert data["ok"] is True
    assert [c["name"] for c in data["certificates"]] == ["ca", "root", *IDENTITIES]
    assert all(len(c["spki_pin"]) == 44 and len(c["cert_sha256"]) == 64 for c in data["certificates"])

    code, out, _ = _run(capsys, "certs", "inspect", "--output-dir", out_dir)
    assert code == 0
    assert "URI:spiffe://aivo.local/ns/default/sa/auth-svc" in out
    assert "IP:127.0.0.1" in out

    code, out, _ = _run(capsys, "certs", "rotate", "--certs-dir", out_dir, "auth-svc", *cfg)
    assert code == 0
    assert "rotated 1 certificate" in out
    rotated = x509.load_pem_x509_certificates(layout.identity_paths("auth-svc")[0].read_bytes())[0]
    assert rotated.serial_number != leaf.serial_number
    code, out, _ = _run(capsys, "certs", "rotate", "--certs-dir", out_dir, "--renew-before-days", "5", *cfg)
    assert code == 0
    assert "nothing to rotate" in out


def test_verify_exits_1_on_any_problem(certs: CertLayout, capsys: pytest.CaptureFixture[str]) -> None:
    certs.identity_paths("learner-svc")[1].chmod(0o644)
    cfg = ("--config", str(MESH_FILE))
    code, out, err = _run(capsys, "certs", "verify", "--certs-dir", str(certs.root), *cfg)
    assert code == 1
    assert "group/others" in out
    assert "1 of 8 certificates" in err
    assert "learner-svc" in err
    code, out, _ = _run(capsys, "certs", "verify", "--certs-dir", str(certs.root), *cfg, "-o", "json")
    assert code == 1
    assert json.loads(out)["ok"] is False


def test_init_refuses_to_overwrite_without_force(
    certs: CertLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    before = certs.ca_cert.read_bytes()
    args = ("certs", "init", "--certs-dir", str(certs.root), "--trust-domain", "aivo.local")
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert "--force" in err
    assert str(certs.ca_dir) in err
    assert certs.ca_cert.read_bytes() == before
    code, out, _ = _run(capsys, *args, "--force")
    assert code == 0
    assert "re-issue" in out
    assert certs.ca_cert.read_bytes() != before


@pytest.mark.parametrize(("argv", "phrase"), [
    (["payments-svc"], "unknown service 'payments-svc'"),
    (["auth-svc", "--valid-days", "0"], "--valid-days"),
    (["auth-svc", "--valid-days", "-1"], "--valid-days"),
    (["auth-svc", "--key-type", "rsa-1024"], "RSA keys shorter than 2048 bits are refused"),
    (["auth-svc", "--valid-days", "100000"], "after the issuing CA expires"),
    ([], "--all"),
    (["auth-svc", "--all"], "--all"),
])
def test_issue_refusals_exit_2(certs: CertLayout, capsys: pytest.CaptureFixture[str], argv: list[str],
                               phrase: str) -> None:
    before = certs.identity_paths("auth-svc")[0].read_bytes()
    code, out, err = _run(capsys, "certs", "issue", *argv, "--certs-dir", str(certs.root),
                          "--config", str(MESH_FILE))
    assert code == 2
    assert phrase in out + err
    assert certs.identity_paths("auth-svc")[0].read_bytes() == before


def test_issue_without_ca_says_to_run_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "certs", "issue", "--all", "--certs-dir", str(tmp_path / "none"),
                        "--config", str(MESH_FILE))
    assert code == 2
    assert "certs init" in err


# --- generate-certs.sh --------------------------------------------------------------------------------


def _meshctl_env() -> dict[str, str]:
    exe = ROOT / ".venv/bin/meshctl"
    meshctl = str(exe) if exe.exists() else f"{sys.executable} -m aivo_mesh"
    return {**os.environ, "MESHCTL": meshctl, "AIVO_MESH_CONFIG": str(MESH_FILE)}


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env=_meshctl_env(), capture_output=True, text=True,
                          timeout=120, check=False)


def _days(layout: CertLayout, name: str) -> int:
    leaf = x509.load_pem_x509_certificates(layout.identity_paths(name)[0].read_bytes())[0]
    return (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days


@pytest.mark.slow  # starts several meshctl processes (~4 s)
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_generate_certs_sh_both_argument_forms(tmp_path: Path) -> None:
    assert os.access(SCRIPT, os.X_OK), "generate-certs.sh must be executable"
    out_dir = tmp_path / "certs"
    # Flag form: creates the CA, issues every leaf, verifies.
    res = _script("--output-dir", str(out_dir), "--valid-days", "30")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "all 8 certificates OK" in res.stdout
    layout = CertLayout(out_dir)
    ca_before = layout.ca_cert.read_bytes()
    assert {n: _days(layout, n) for n in IDENTITIES} == dict.fromkeys(IDENTITIES, 30)
    assert stat.S_IMODE(layout.identity_paths("auth-svc")[1].stat().st_mode) == 0o600

    # Positional form on the same directory: the CA is kept, leaves are re-issued for 20 days.
    res = _script(str(out_dir), "20")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "reusing it" in res.stdout
    assert layout.ca_cert.read_bytes() == ca_before
    assert _days(layout, "mesh-client") == 20

    # Bad input fails fast with exit 2.
    assert _script(str(out_dir), "zero").returncode == 2
    assert _script("--bogus").returncode == 2


# --- revocation -----------------------------------------------------------------------------------------


def _leaf_of(layout: CertLayout, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(layout.identity_paths(name)[0].read_bytes())[0]


def test_revoke_records_in_mesh_yaml_keeps_comments_and_signs_a_crl(
        certs: CertLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mesh_yaml = tmp_path / "mesh.yaml"
    mesh_yaml.write_text((ROOT / "mesh.yaml").read_text())
    before = mesh_yaml.read_text()
    auth = _leaf_of(certs, "auth-svc")
    code, out, err = _run(capsys, "certs", "revoke", "auth-svc", "DEAD:BEEF", "-d", str(certs.root),
                          "-c", str(mesh_yaml), "--note", "key leaked")
    assert code == 0, err
    assert "re-issue it with `meshctl certs rotate auth-svc`" in out
    text = mesh_yaml.read_text()
    assert text.startswith(before)  # every comment and line of the original kept

    revoked = load_mesh(mesh_yaml).certificates.revoked
    assert [(r.serial, r.identity, r.note) for r in revoked] == [
        (f"{auth.serial_number:x}", "auth-svc", "key leaked"), ("deadbeef", None, "key leaked")]
    crl = x509.load_pem_x509_crl(certs.crl.read_bytes())
    assert {c.serial_number for c in crl} == {auth.serial_number, 0xDEADBEEF}
    openssl = optional("openssl")
    if openssl is not None:
        # openssl agrees: the CA signed it, and the revoked leaf now fails verification against it.
        leaf = tmp_path / "leaf.pem"
        leaf.write_bytes(certs.identity_paths("auth-svc")[0].read_bytes())
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(certs.ca_cert.read_bytes() + certs.crl.read_bytes())
        done = subprocess.run([openssl, "verify", "-crl_check", "-CAfile", str(bundle), str(leaf)],
                              capture_output=True, text=True, check=False)
        assert done.returncode != 0 and "revoked" in (done.stdout + done.stderr)
    # certs verify reports it against mesh.yaml: the current auth-svc certificate is now refused everywhere.
    code, out, _ = _run(capsys, "certs", "verify", "-d", str(certs.root), "-c", str(mesh_yaml), "-o", "json")
    assert code == 1
    auth_report = next(r for r in json.loads(out)["certificates"] if r["name"] == "auth-svc")
    assert any("revoked in mesh.yaml" in p for p in auth_report["problems"]), auth_report
    # A bad target: exit 2, nothing written.
    code, _, err = _run(capsys, "certs", "revoke", "no-such-thing", "-d", str(certs.root), "-c", str(mesh_yaml))
    assert code == 2 and "nor a hex certificate serial" in err
    assert load_mesh(mesh_yaml).certificates.revoked == revoked
    if openssl is None:  # reported, not passed: the openssl cross-check above did not run
        pytest.skip("all else passed; the openssl cross-check of the CRL needs openssl (apt-get install openssl)")


def test_rotate_can_revoke_what_it_replaced(certs: CertLayout, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    mesh_yaml = tmp_path / "mesh.yaml"
    mesh_yaml.write_text((ROOT / "mesh.yaml").read_text())
    serials = []
    for _ in range(3):
        serials.append(_leaf_of(certs, "learner-svc").serial_number)
        code, _, err = _run(capsys, "certs", "rotate", "learner-svc", "--revoke-previous", "-d", str(certs.root),
                            "-c", str(mesh_yaml))
        assert code == 0, err

    revoked = {int(r.serial, 16) for r in load_mesh(mesh_yaml).certificates.revoked if r.serial}
    assert revoked == set(serials)
    assert _leaf_of(certs, "learner-svc").serial_number not in revoked  # the current one stays good
    assert {c.serial_number for c in x509.load_pem_x509_crl(certs.crl.read_bytes())} == set(serials)
    code, out, _ = _run(capsys, "certs", "crl", "-d", str(certs.root), "-c", str(mesh_yaml))
    assert code == 0 and "3 revoked serial(s)" in out


# --- flags and exit codes shared by the certs commands ------------------------------------------------


def test_o_is_the_output_format_and_d_the_certs_dir(certs: CertLayout, capsys: pytest.CaptureFixture[str]) -> None:
    # -o once meant --output-dir: `certs inspect -o json` looked for a directory named json.
    code, out, err = _run(capsys, "certs", "inspect", "-o", "json", "-d", str(certs.root))
    assert code == 0, err
    assert json.loads(out)["certs_dir"] == str(certs.root)
    code, out, _ = _run(capsys, "certs", "verify", "-o", "yaml", "--certs-dir", str(certs.root),
                        "--config", str(MESH_FILE))
    assert code == 0
    assert yaml.safe_load(out)["ok"] is True
    code, _, err = _run(capsys, "certs", "inspect", "-o", str(certs.root))
    assert code == 2
    assert "'--output'" in err and "'text', 'json', 'yaml'" in err


def _expire(layout: CertLayout, name: str) -> None:
    issuer = load_issuer(layout)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = build_leaf(issuer, load_mesh(MESH_FILE), name, key, 2, datetime.now(UTC) - timedelta(days=10))
    cert_path, key_path = layout.identity_paths(name)
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                          + issuer.cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


@pytest.mark.parametrize(("problem", "code", "phrase"), [
    ("none", 0, ""),
    ("expired", 1, "expired on"),
    ("unreadable", 1, "auth-svc"),
    ("missing dir", 2, "certs directory not found"),
])
def test_verify_and_inspect_agree_on_exit_codes(certs: CertLayout, capsys: pytest.CaptureFixture[str],
                                                problem: str, code: int, phrase: str) -> None:
    where = certs.root
    if problem == "expired":
        _expire(certs, "auth-svc")
    elif problem == "unreadable":
        certs.identity_paths("auth-svc")[0].write_text("not a certificate\n")
    elif problem == "missing dir":
        where = certs.root / "nowhere"
    for command in (("verify", "--config", str(MESH_FILE)), ("inspect",)):
        got, out, err = _run(capsys, "certs", *command, "-d", str(where))
        assert got == code, (command, out, err)
        assert phrase in out + err, (command, out, err)
        assert "Traceback" not in err
