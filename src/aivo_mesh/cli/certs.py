"""`meshctl certs init|issue|verify|inspect|rotate|revoke|crl`: the mesh PKI from the command line.

The work is done by `aivo_mesh.pki`; this module parses flags and prints rich tables. Bad input
(unknown service, existing CA without --force, weak key type, unreadable files) raises PkiError or
ConfigError, which `meshctl` turns into `error: FILE: reason` and exit code 2. `verify` exits 1 when
any certificate has a problem.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from aivo_mesh.cli._root import cli
from aivo_mesh.config import find_mesh_file, load_mesh
from aivo_mesh.config.edit import add_revocations
from aivo_mesh.config.model import MeshSpec
from aivo_mesh.errors import MeshError, PkiError
from aivo_mesh.pki import (
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    LEAF_VALID_DAYS,
    ROOT_VALID_DAYS,
    CertLayout,
    CertReport,
    IssuedCert,
    check_identity,
    init_ca,
    inspect_layout,
    issue_leaf,
    known_identities,
    parse_key_type,
    rotate,
    store,
    verify_layout,
)
from aivo_mesh.pki.revoke import Revocation, leaf_revocation, revocation_for, revoked_serials, write_crl

DEFAULT_OUTPUT_DIR = "certs"


def _parse_key_type(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--key-type: ec-p256 | ec-p384 | rsa-2048 | rsa-3072 | rsa-4096; rsa-1024 is refused, clearly."""
    if value is None:
        return None
    try:
        return parse_key_type(value)
    except PkiError as exc:
        raise click.BadParameter(exc.reason, ctx=ctx, param=param) from None


_output_dir = click.option(
    "--output-dir", "-o", "output_dir", type=click.Path(file_okay=False, path_type=Path),
    default=Path(DEFAULT_OUTPUT_DIR), show_default="./certs",
    help="The certs directory (layout: see `aivo_mesh.pki.layout`).",
)
_config = click.option(
    "--config", "-c", "config", type=click.Path(dir_okay=False), default=None,
    help="mesh.yaml (default: $AIVO_MESH_CONFIG, ./mesh.yaml, else the repository's).",
)
_key_type = click.option(
    "--key-type", metavar="[" + "|".join(KEY_TYPES) + "]", default=None, callback=_parse_key_type,
    help=f"Key algorithm of new keys (default {DEFAULT_KEY_TYPE}).",
)


def _console() -> Console:
    # Not a terminal (pipes, CI logs, tests): wide enough that pins and hashes are never wrapped.
    return Console() if sys.stdout.isatty() else Console(width=240, soft_wrap=False)


def _mesh(config: str | None) -> MeshSpec:
    return load_mesh(find_mesh_file(config))


def _date(dt: datetime | None) -> str:
    return f"{dt:%Y-%m-%d %H:%M}Z" if dt else "-"


def _require_ca(layout: CertLayout) -> None:
    if not layout.ca_cert.exists():
        raise PkiError(
            str(layout.ca_cert),
            f"no CA in {layout.root}; run `meshctl certs init --output-dir {layout.root}` first",
        )


def _issued_table(title: str, issued: list[IssuedCert]) -> Table:
    table = Table(title=title)
    for col in ("name", "certificate", "serial", "not after", "SPKI pin (sha256)"):
        table.add_column(col, no_wrap=True)
    for c in issued:
        table.add_row(c.name, str(c.cert_path), f"{c.serial:x}"[:16] + "…", _date(c.not_after), c.spki_pin)
    return table


@cli.group("certs")
def certs() -> None:
    """Mesh PKI: a root + issuing CA and one SPIFFE X.509 certificate per service and client."""


@certs.command("init")
@_output_dir
@click.option("--valid-days", type=click.IntRange(min=1), default=ROOT_VALID_DAYS, show_default=True,
              help="Lifetime of the root CA (and, by default, of the issuing CA).")
@click.option("--issuer-valid-days", type=click.IntRange(min=1), default=None,
              help="Lifetime of the issuing (intermediate) CA; default: --valid-days.")
@click.option("--trust-domain", default=None,
              help="SPIFFE trust domain (default: mesh.trust_domain of mesh.yaml).")
@_config
@_key_type
@click.option("--force", is_flag=True, help="Replace an existing CA (every leaf must then be re-issued).")
def init_cmd(output_dir: Path, valid_days: int, issuer_valid_days: int | None, trust_domain: str | None,
             config: str | None, key_type: str | None, force: bool) -> None:
    """Create the root CA and the issuing CA in OUTPUT_DIR/ca/."""
    td = trust_domain or _mesh(config).mesh.trust_domain
    layout = CertLayout(output_dir)
    info = init_ca(layout, td, valid_days, force, issuer_valid_days=issuer_valid_days,
                   key_type=key_type or DEFAULT_KEY_TYPE)
    console = _console()
    table = Table(title=f"mesh CA for trust domain {td}")
    for col in ("name", "file", "subject", "not after", "SPKI pin (sha256)"):
        table.add_column(col, no_wrap=True)
    for c in (info.root, info.issuer):
        table.add_row(c.name, str(c.cert_path), c.subject, _date(c.not_after), c.spki_pin)
    console.print(table)
    console.print(f"trust bundle: {info.bundle_path}   issuing key: {layout.ca_key}")
    console.print(f"the root key {layout.root_key} is not needed to issue certificates: "
                  "it may be kept offline")
    if force:
        console.print("[yellow]CA replaced: re-issue every certificate (meshctl certs issue --all)[/yellow]")


@certs.command("issue")
@click.argument("services", nargs=-1, metavar="[SERVICE]...")
@click.option("--all", "all_", is_flag=True,
              help="Every service of mesh.yaml and every client identity (mesh-client).")
@_output_dir
@click.option("--valid-days", type=click.IntRange(min=1), default=LEAF_VALID_DAYS, show_default=True,
              help="Lifetime of each certificate (must end before the issuing CA's).")
@_config
@_key_type
def issue_cmd(services: tuple[str, ...], all_: bool, output_dir: Path, valid_days: int, config: str | None,
              key_type: str | None) -> None:
    """Issue (or re-issue with a new key) the certificate of SERVICE, or of everyone with --all."""
    if all_ == bool(services):
        raise click.UsageError("name a SERVICE or pass --all (not both)")
    mesh = _mesh(config)
    layout = CertLayout(output_dir)
    names = list(known_identities(mesh)) if all_ else list(dict.fromkeys(services))
    for n in names:  # refuse unknown names before writing anything
        check_identity(mesh, n, layout)
    _require_ca(layout)
    issued = [issue_leaf(layout, n, mesh, valid_days, key_type=key_type or DEFAULT_KEY_TYPE) for n in names]
    _console().print(_issued_table(f"issued {len(issued)} certificate(s) in {layout.root}", issued))


def _report_status(r: CertReport) -> str:
    return "[green]OK[/green]" if r.ok else "[red]" + "\n".join(f"• {p}" for p in r.problems) + "[/red]"


@certs.command("verify")
@_output_dir
@_config
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_cmd(output_dir: Path, config: str | None, as_json: bool) -> None:
    """Check every certificate against the CA and mesh.yaml; exit 1 on any problem (exit 2: bad input).

    Checks: chain to ca/ca.crt (WebPKI rules, as a client and as a server for 127.0.0.1), validity,
    SANs (every DNS name, IP 127.0.0.1 as an IPAddress, exactly one SPIFFE URI), the peer policy every
    peer applies (EKU for the identity's roles, key usage, CA:FALSE, RSA >= 2048 / P-256 / P-384,
    no SHA-1), revocation and pins from mesh.yaml, key matches cert, key file mode 0600.
    """
    mesh = _mesh(config)
    layout = CertLayout(output_dir)
    reports = verify_layout(layout, mesh)
    bad = [r for r in reports if not r.ok]
    if as_json:
        click.echo(json.dumps({"certs_dir": str(layout.root), "ok": not bad,
                               "certificates": [r.to_dict() for r in reports]}, indent=2))
    else:
        console = _console()
        table = Table(title=f"certificates in {layout.root}")
        table.add_column("name", no_wrap=True)
        table.add_column("status")
        table.add_column("days left", justify="right", no_wrap=True)
        table.add_column("SPKI pin (sha256, base64)", no_wrap=True)
        table.add_column("SHA-256 (DER, hex)", no_wrap=True)
        for r in reports:
            days = "-" if r.days_left is None else str(r.days_left)
            table.add_row(r.name, _report_status(r), days, r.spki_pin or "-", r.cert_sha256 or "-")
        console.print(table)
        if not bad:
            console.print(f"[green]all {len(reports)} certificates OK[/green]")
    if bad:
        # A MeshError, not ctx.exit(1): `meshctl`'s main() maps it to exit code 1 (click's
        # non-standalone mode would swallow an Exit's code).
        raise MeshError(f"{len(bad)} of {len(reports)} certificates in {layout.root} have problems: "
                        + ", ".join(r.name for r in bad))


@certs.command("inspect")
@_output_dir
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(output_dir: Path, as_json: bool) -> None:
    """List every certificate in OUTPUT_DIR: subject, SANs, expiry (no checks; see `verify`)."""
    layout = CertLayout(output_dir)
    if not layout.root.is_dir():
        raise PkiError(str(layout.root), "certs directory not found")
    reports = inspect_layout(layout)
    if as_json:
        click.echo(json.dumps({"certs_dir": str(layout.root), "certificates": [r.to_dict() for r in reports]},
                              indent=2))
        return
    table = Table(title=f"certificates in {layout.root}")
    for col in ("name", "subject", "SANs", "not after", "days left"):
        table.add_column(col, justify="right" if col == "days left" else "left",
                         no_wrap=col in ("name", "not after", "days left"))
    for r in reports:
        if r.problems:
            table.add_row(r.name, "[red]" + "; ".join(r.problems) + "[/red]", "", "", "")
            continue
        days = "-" if r.days_left is None else str(r.days_left)
        if r.days_left is not None and r.days_left < 0:
            days = f"[red]{days}[/red]"
        table.add_row(r.name, r.subject, "\n".join(r.sans) or "-", _date(r.not_after), days)
    _console().print(table)


@certs.command("rotate")
@click.argument("services", nargs=-1, metavar="[SERVICE]...")
@click.option("--all", "all_", is_flag=True, help="Every service and client (the default when no SERVICE).")
@_output_dir
@click.option("--valid-days", type=click.IntRange(min=1), default=LEAF_VALID_DAYS, show_default=True)
@click.option("--renew-before-days", type=click.IntRange(min=0), default=None,
              help="Only re-issue certificates expiring within this many days (or missing/invalid).")
@_config
@_key_type
@click.option("--revoke-previous", is_flag=True,
              help="Revoke each replaced certificate (mesh.yaml certificates.revoked and ca/crl.pem).")
def rotate_cmd(services: tuple[str, ...], all_: bool, output_dir: Path, valid_days: int,
               renew_before_days: int | None, config: str | None, key_type: str | None,
               revoke_previous: bool) -> None:
    """Re-issue leaf certificates with NEW keys, in place and atomically; the CA is untouched."""
    if all_ and services:
        raise click.UsageError("name SERVICEs or pass --all (not both)")
    mesh = _mesh(config)
    layout = CertLayout(output_dir)
    _require_ca(layout)
    names = list(dict.fromkeys(services)) if services else None
    previous: dict[str, Revocation] = {}
    if revoke_previous:
        for n in names or known_identities(mesh):
            if layout.identity_paths(n)[0].exists():
                previous[n] = leaf_revocation(layout, mesh, n, "rotated")
    rotated = rotate(layout, mesh, names, valid_days, renew_before_days, key_type=key_type)
    console = _console()
    if not rotated:
        console.print(f"nothing to rotate: every certificate is valid for more than {renew_before_days} days")
        return
    console.print(_issued_table(f"rotated {len(rotated)} certificate(s) in {layout.root}", rotated))
    if revoke_previous:
        gone = [previous[c.name] for c in rotated if c.name in previous]
        path = _record_revocations(layout, config, gone)
        console.print(f"revoked the {len(gone)} previous certificate(s) in {path} (and {layout.crl})")


def _record_revocations(layout: CertLayout, config: str | None, entries: list[Revocation]) -> Path:
    """Add `entries` to mesh.yaml's certificates.revoked (comments kept) and re-sign the CRL."""
    path = find_mesh_file(config)
    edited, mesh = add_revocations(path.read_text(), [e.as_yaml_fields() for e in entries], str(path))
    store.write_atomic(path, edited.encode(), path.stat().st_mode & 0o777)
    write_crl(layout, mesh)
    return path


@certs.command("revoke")
@click.argument("targets", nargs=-1, required=True, metavar="SERVICE|SERIAL...")
@_output_dir
@_config
@click.option("--note", default="", help="Why, kept beside the entry in mesh.yaml.")
def revoke_cmd(targets: tuple[str, ...], output_dir: Path, config: str | None, note: str) -> None:
    """Refuse a certificate everywhere: SERVICE's current one (serial and key) or a serial (hex).

    Adds it to mesh.yaml's certificates.revoked (the proxyless plane reads it; running processes pick the
    change up) and re-signs OUTPUT_DIR/ca/crl.pem, the CRL rendered Envoy configs reference."""
    mesh = _mesh(config)
    layout = CertLayout(output_dir)
    _require_ca(layout)
    entries = [revocation_for(layout, mesh, t, note) for t in dict.fromkeys(targets)]
    path = _record_revocations(layout, config, entries)
    console = _console()
    for e in entries:
        what = f"{e.identity}'s current certificate" if e.identity else "certificate"
        console.print(f"revoked {what}: serial {e.serial}" + (f", key {e.spki}" if e.spki else ""))
        if e.identity:
            console.print(f"  every peer now refuses it: re-issue it with `meshctl certs rotate {e.identity}`")
    console.print(f"recorded in {path}; CRL: {layout.crl}")


@certs.command("crl")
@_output_dir
@_config
def crl_cmd(output_dir: Path, config: str | None) -> None:
    """Re-sign OUTPUT_DIR/ca/crl.pem from mesh.yaml's certificates.revoked (after editing it by hand)."""
    mesh = _mesh(config)
    layout = CertLayout(output_dir)
    _require_ca(layout)
    write_crl(layout, mesh)
    _console().print(f"wrote {layout.crl}: {len(revoked_serials(mesh))} revoked serial(s)")
