"""Certificates the mesh must refuse, minted by the mesh's own issuing CA with the openssl CLI.

The attacker of the peer-policy tests can get anything signed by the mesh CA (a misconfigured issuance,
or an old certificate that was rotated away); each `mint` call breaks exactly one rule and is otherwise
a proper X.509-SVID (KeyUsage, ExtendedKeyUsage, SKI/AKI, the SPIFFE URI and the service's DNS names),
so a refusal can only be for that rule. openssl rather than `cryptography`: cryptography refuses to sign
with SHA-1, and the SHA-1 case is one of the rules.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from binaries import needs, require

from aivo_mesh.config import MeshSpec
from aivo_mesh.pki import CertLayout, dns_names_for

needs_openssl = needs("openssl")


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("openssl"), *args], capture_output=True, text=True, timeout=60, check=False)


def mint(
    layout: CertLayout,
    mesh: MeshSpec,
    name: str,
    out: Path,
    *,
    key: str = "ec:P-256",
    digest: str = "sha256",
    ca: bool = False,
    uris: Sequence[str] | None = None,
    dns: Sequence[str] | None = None,
    eku: Sequence[str] = ("serverAuth", "clientAuth"),
    serial: int | None = None,
) -> tuple[Path, Path]:
    """(certificate chain file, key file) for `name`, signed by `layout`'s issuing CA. `key` is openssl's
    `-newkey` value or `ec:P-256`/`ec:P-384`; `uris`/`dns` default to the identity's own."""
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path, csr = out / f"{name}.crt", out / f"{name}-key.pem", out / f"{name}.csr"
    if key.startswith("ec:P-"):
        params = out / "ec.params"
        curve = {"ec:P-256": "prime256v1", "ec:P-384": "secp384r1"}[key]
        assert openssl("ecparam", "-name", curve, "-out", str(params)).returncode == 0
        key = f"ec:{params}"
    done = openssl("req", "-new", "-newkey", key, "-nodes", "-keyout", str(key_path), "-subj", f"/CN={name}",
                   "-out", str(csr))
    assert done.returncode == 0, done.stderr
    key_path.chmod(0o600)
    sans = [f"DNS:{d}" for d in (dns_names_for(mesh, name) if dns is None else dns)]
    sans += ["IP:127.0.0.1"] + [f"URI:{u}" for u in ([mesh.spiffe_id(name)] if uris is None else uris)]
    ext = out / f"{name}.ext"
    lines = [f"basicConstraints=critical,CA:{'TRUE' if ca else 'FALSE'}",
             "keyUsage=critical,digitalSignature" + (",keyCertSign" if ca else ""),
             "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid", f"subjectAltName={','.join(sans)}"]
    if eku:
        lines.append(f"extendedKeyUsage={','.join(eku)}")
    ext.write_text("\n".join(lines) + "\n")
    serial = secrets.randbits(63) if serial is None else serial
    done = openssl("x509", "-req", "-in", str(csr), "-CA", str(layout.issuer_cert), "-CAkey", str(layout.ca_key),
                   "-set_serial", str(serial), "-days", "2", f"-{digest}", "-extfile", str(ext), "-out", str(cert_path))
    assert done.returncode == 0, done.stderr
    # Leaf + intermediate, as the mesh's own certificate files are.
    cert_path.write_bytes(cert_path.read_bytes() + layout.issuer_cert.read_bytes())
    return cert_path, key_path


def replace_identity(layout: CertLayout, name: str, cert: Path, key: Path) -> None:
    """Put a minted pair where `layout` keeps `name`'s certificate (0600 key)."""
    cert_path, key_path = layout.identity_paths(name)
    shutil.copyfile(cert, cert_path)
    shutil.copyfile(key, key_path)
    key_path.chmod(0o600)
