"""`meshctl certs init|issue|verify|inspect|rotate|revoke|crl`: the mesh PKI from the command line.

The work is done by `aivo_mesh.pki`; this module parses flags and prints rich tables. Bad input
(unknown service, existing CA without --force, weak key type, unreadable files) raises PkiError or
ConfigError, which `meshctl` turns into `error: FILE: reason` and exit code 2. `verify` and `inspect`
exit 1 when a certificate has a problem (each checks what it can see), 2 when the certs directory is
missing. `-o json|yaml` prints the same data as the tables; the certs directory is `-d/--certs-dir`.

`cryptography` (aivo_mesh.pki's modules but layout and params), mesh.yaml's model and rich's tables are
imported by the commands that use them, not when meshctl starts.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from aivo_mesh.cli._complete import complete_identities
from aivo_mesh.cli._output import emit, json_alias_option, output_option, pick_output, rich_console
from aivo_mesh.cli._root import cli
from aivo_mesh.errors import MeshError, PkiError
from aivo_mesh.pki.layout import CertLayout
from aivo_mesh.pki.params import DEFAULT_KEY_TYPE, KEY_TYPES, LEAF_VALID_DAYS, ROOT_VALID_DAYS

if TYPE_CHECKING:
    from rich.table import Table

    from aivo_mesh.config.model import MeshSpec
    from aivo_mesh.pki.issue import IssuedCert
    from aivo_mesh.pki.revoke import Revocation
    from aivo_mesh.pki.verify import CertReport

DEFAULT_CERTS_DIR = "certs"


def _parse_key_type(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--key-type: ec-p256 | ec-p384 | rsa-2048 | rsa-3072 | rsa-4096; rsa-1024 is refused, clearly."""
    if value is None:
        return None
    from aivo_mesh.pki.crypto import parse_key_type

    try:
        return parse_key_type(value)
    except PkiError as exc:
        raise click.BadParameter(exc.reason, ctx=ctx, param=param) from None


# -o is --output (text|json|yaml) in every meshctl command; --output-dir stays as a long alias.
_certs_dir = click.option(
    "--certs-dir", "-d", "--output-dir", "certs_dir", type=click.Path(file_okay=False, path_type=Path),
    default=Path(DEFAULT_CERTS_DIR), show_default="./certs",
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


# Off a terminal, wide enough that pins and hashes are never wrapped.
WIDTH = 240


def _mesh(config: str | None) -> MeshSpec:
    from aivo_mesh.config.loader import find_mesh_file, load_mesh

    return load_mesh(find_mesh_file(config))


def _date(dt: datetime | None) -> str:
    return f"{dt:%Y-%m-%d %H:%M}Z" if dt else "-"


def _require_ca(layout: CertLayout) -> None:
    if not layout.ca_cert.exists():
        raise PkiError(
            str(layout.ca_cert),
            f"no CA in {layout.root}; run `meshctl certs init --certs-dir {layout.root}` first",
        )


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def _issued_dict(c: IssuedCert) -> dict[str, object]:
    return {"name": c.name, "path": str(c.cert_path), "key_path": str(c.key_path) if c.key_path else None,
            "subject": c.subject, "serial": f"{c.serial:x}", "not_before": _iso(c.not_before),
            "not_after": _iso(c.not_after), "spki_pin": c.spki_pin, "cert_sha256": c.cert_sha256,
            "key_type": c.key_type}


def _require_dir(layout: CertLayout) -> None:
    """A missing certs directory is bad input for every command that reads one (exit 2)."""
    if not layout.root.is_dir():
        raise PkiError(str(layout.root), "certs directory not found (expected the directory `meshctl certs "
                                         "init` created; pass it with --certs-dir)")


def _issued_table(title: str, issued: list[IssuedCert]) -> Table:
    from rich.table import Table

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
@_certs_dir
@click.option("--valid-days", type=click.IntRange(min=1), default=ROOT_VALID_DAYS, show_default=True,
              help="Lifetime of the root CA (and, by default, of the issuing CA).")
@click.option("--issuer-valid-days", type=click.IntRange(min=1), default=None,
              help="Lifetime of the issuing (intermediate) CA; default: --valid-days.")
@click.option("--trust-domain", default=None,
              help="SPIFFE trust domain (default: mesh.trust_domain of mesh.yaml).")
@_config
@_key_type
@click.option("--force", is_flag=True, help="Replace an existing CA (every leaf must then be re-issued).")
@output_option
def init_cmd(certs_dir: Path, valid_days: int, issuer_valid_days: int | None, trust_domain: str | None,
             config: str | None, key_type: str | None, force: bool, output: str) -> None:
    """Create the root CA and the issuing CA in CERTS_DIR/ca/."""
    from rich.table import Table

    from aivo_mesh.pki.issue import init_ca

    td = trust_domain or _mesh(config).mesh.trust_domain
    layout = CertLayout(certs_dir)
    info = init_ca(layout, td, valid_days, force, issuer_valid_days=issuer_valid_days,
                   key_type=key_type or DEFAULT_KEY_TYPE)
    if output != "text":
        emit({"certs_dir": str(layout.root), "trust_domain": td,
              "certificates": [_issued_dict(info.root), _issued_dict(info.issuer)],
              "bundle": str(info.bundle_path), "issuing_key": str(layout.ca_key), "root_key": str(layout.root_key),
              "replaced": force}, output)
        return
    console = rich_console(WIDTH)
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
@click.argument("services", nargs=-1, metavar="[SERVICE]...", shell_complete=complete_identities)
@click.option("--all", "all_", is_flag=True,
              help="Every service of mesh.yaml and every client identity (mesh-client).")
@_certs_dir
@click.option("--valid-days", type=click.IntRange(min=1), default=LEAF_VALID_DAYS, show_default=True,
              help="Lifetime of each certificate (must end before the issuing CA's).")
@_config
@_key_type
@output_option
def issue_cmd(services: tuple[str, ...], all_: bool, certs_dir: Path, valid_days: int, config: str | None,
              key_type: str | None, output: str) -> None:
    """Issue (or re-issue with a new key) the certificate of SERVICE, or of everyone with --all."""
    from aivo_mesh.pki.issue import check_identity, issue_leaf, known_identities

    if all_ == bool(services):
        raise click.UsageError("name a SERVICE or pass --all (not both)")
    mesh = _mesh(config)
    layout = CertLayout(certs_dir)
    names = list(known_identities(mesh)) if all_ else list(dict.fromkeys(services))
    for n in names:  # refuse unknown names before writing anything
        check_identity(mesh, n, layout)
    _require_ca(layout)
    issued = [issue_leaf(layout, n, mesh, valid_days, key_type=key_type or DEFAULT_KEY_TYPE) for n in names]
    if output != "text":
        emit({"certs_dir": str(layout.root), "certificates": [_issued_dict(c) for c in issued]}, output)
        return
    rich_console(WIDTH).print(_issued_table(f"issued {len(issued)} certificate(s) in {layout.root}", issued))


def _report_status(r: CertReport) -> str:
    return "[green]OK[/green]" if r.ok else "[red]" + "\n".join(f"• {p}" for p in r.problems) + "[/red]"


def verify_data(layout: CertLayout, reports: list[CertReport]) -> dict[str, object]:
    return {"certs_dir": str(layout.root), "ok": all(r.ok for r in reports),
            "certificates": [r.to_dict() for r in reports]}


@certs.command("verify")
@_certs_dir
@_config
@output_option
@json_alias_option
def verify_cmd(certs_dir: Path, config: str | None, output: str, as_json: bool) -> None:
    """Check every certificate against the CA and mesh.yaml; exit 1 on any problem (exit 2: bad input,
    such as a missing certs directory).

    Checks: chain to ca/ca.crt (WebPKI rules, as a client and as a server for 127.0.0.1), validity,
    SANs (every DNS name, IP 127.0.0.1 as an IPAddress, exactly one SPIFFE URI), the peer policy every
    peer applies (EKU for the identity's roles, key usage, CA:FALSE, RSA >= 2048 / P-256 / P-384,
    no SHA-1), revocation and pins from mesh.yaml, key matches cert, key file mode 0600.
    """
    from rich.table import Table

    from aivo_mesh.pki.verify import verify_layout

    output = pick_output(output, as_json)
    mesh = _mesh(config)
    layout = CertLayout(certs_dir)
    _require_dir(layout)
    reports = verify_layout(layout, mesh)
    bad = [r for r in reports if not r.ok]
    if output != "text":
        emit(verify_data(layout, reports), output)
    else:
        console = rich_console(WIDTH)
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
    _fail_on(layout, reports)


def _fail_on(layout: CertLayout, reports: list[CertReport]) -> None:
    bad = [r for r in reports if not r.ok]
    if bad:
        # A MeshError, not ctx.exit(1): `meshctl`'s main() maps it to exit code 1 (click's
        # non-standalone mode would swallow an Exit's code).
        raise MeshError(f"{len(bad)} of {len(reports)} certificates in {layout.root} have problems: "
                        + ", ".join(r.name for r in bad))


@certs.command("inspect")
@_certs_dir
@output_option
@json_alias_option
def inspect_cmd(certs_dir: Path, output: str, as_json: bool) -> None:
    """List every certificate in CERTS_DIR: subject, SANs, expiry. Exit 1 when one cannot be read or is
    outside its validity (as `verify`, which also checks chain, SANs, keys against mesh.yaml)."""
    from rich.table import Table

    from aivo_mesh.pki.verify import inspect_layout

    output = pick_output(output, as_json)
    layout = CertLayout(certs_dir)
    _require_dir(layout)
    reports = inspect_layout(layout)
    if output != "text":
        emit(verify_data(layout, reports), output)
    else:
        table = Table(title=f"certificates in {layout.root}")
        for col in ("name", "subject", "SANs", "not after", "days left"):
            table.add_column(col, justify="right" if col == "days left" else "left",
                             no_wrap=col in ("name", "not after", "days left"))
        for r in reports:
            if r.not_after is None:  # unreadable: nothing but the problem to show
                table.add_row(r.name, "[red]" + "; ".join(r.problems) + "[/red]", "", "", "")
                continue
            days = "-" if r.days_left is None else str(r.days_left)
            if r.problems:
                days = f"[red]{days} ({'; '.join(r.problems)})[/red]"
            table.add_row(r.name, r.subject, "\n".join(r.sans) or "-", _date(r.not_after), days)
        rich_console(WIDTH).print(table)
    _fail_on(layout, reports)


@certs.command("rotate")
@click.argument("services", nargs=-1, metavar="[SERVICE]...", shell_complete=complete_identities)
@click.option("--all", "all_", is_flag=True, help="Every service and client (the default when no SERVICE).")
@_certs_dir
@click.option("--valid-days", type=click.IntRange(min=1), default=LEAF_VALID_DAYS, show_default=True)
@click.option("--renew-before-days", type=click.IntRange(min=0), default=None,
              help="Only re-issue certificates expiring within this many days (or missing/invalid).")
@_config
@_key_type
@click.option("--revoke-previous", is_flag=True,
              help="Revoke each replaced certificate (mesh.yaml certificates.revoked and ca/crl.pem).")
@output_option
def rotate_cmd(services: tuple[str, ...], all_: bool, certs_dir: Path, valid_days: int,
               renew_before_days: int | None, config: str | None, key_type: str | None,
               revoke_previous: bool, output: str) -> None:
    """Re-issue leaf certificates with NEW keys, in place and atomically; the CA is untouched."""
    from aivo_mesh.pki.issue import known_identities, rotate
    from aivo_mesh.pki.revoke import leaf_revocation

    if all_ and services:
        raise click.UsageError("name SERVICEs or pass --all (not both)")
    mesh = _mesh(config)
    layout = CertLayout(certs_dir)
    _require_ca(layout)
    names = list(dict.fromkeys(services)) if services else None
    previous: dict[str, Revocation] = {}
    if revoke_previous:
        for n in names or known_identities(mesh):
            if layout.identity_paths(n)[0].exists():
                previous[n] = leaf_revocation(layout, mesh, n, "rotated")
    rotated = rotate(layout, mesh, names, valid_days, renew_before_days, key_type=key_type)
    gone = [previous[c.name] for c in rotated if c.name in previous]
    path = _record_revocations(layout, config, gone) if rotated and revoke_previous else None
    if output != "text":
        emit({"certs_dir": str(layout.root), "certificates": [_issued_dict(c) for c in rotated],
              "revoked": [{"serial": e.serial, "spki": e.spki, "identity": e.identity, "note": e.note}
                          for e in gone] if path else []}, output)
        return
    console = rich_console(WIDTH)
    if not rotated:
        console.print(f"nothing to rotate: every certificate is valid for more than {renew_before_days} days")
        return
    console.print(_issued_table(f"rotated {len(rotated)} certificate(s) in {layout.root}", rotated))
    if path is not None:
        console.print(f"revoked the {len(gone)} previous certificate(s) in {path} (and {layout.crl})")


def _record_revocations(layout: CertLayout, config: str | None, entries: list[Revocation]) -> Path:
    """Add `entries` to mesh.yaml's certificates.revoked (comments kept) and re-sign the CRL."""
    from aivo_mesh.config.edit import add_revocations
    from aivo_mesh.config.loader import find_mesh_file
    from aivo_mesh.pki import store
    from aivo_mesh.pki.revoke import write_crl

    path = find_mesh_file(config)
    edited, mesh = add_revocations(path.read_text(), [e.as_yaml_fields() for e in entries], str(path))
    store.write_atomic(path, edited.encode(), path.stat().st_mode & 0o777)
    write_crl(layout, mesh)
    return path


@certs.command("revoke")
@click.argument("targets", nargs=-1, required=True, metavar="SERVICE|SERIAL...",
                shell_complete=complete_identities)
@_certs_dir
@_config
@click.option("--note", default="", help="Why, kept beside the entry in mesh.yaml.")
def revoke_cmd(targets: tuple[str, ...], certs_dir: Path, config: str | None, note: str) -> None:
    """Refuse a certificate everywhere: SERVICE's current one (serial and key) or a serial (hex).

    Adds it to mesh.yaml's certificates.revoked (the proxyless plane reads it; running processes pick the
    change up) and re-signs CERTS_DIR/ca/crl.pem, the CRL rendered Envoy configs reference."""
    from aivo_mesh.pki.revoke import revocation_for

    mesh = _mesh(config)
    layout = CertLayout(certs_dir)
    _require_ca(layout)
    entries = [revocation_for(layout, mesh, t, note) for t in dict.fromkeys(targets)]
    path = _record_revocations(layout, config, entries)
    console = rich_console(WIDTH)
    for e in entries:
        what = f"{e.identity}'s current certificate" if e.identity else "certificate"
        console.print(f"revoked {what}: serial {e.serial}" + (f", key {e.spki}" if e.spki else ""))
        if e.identity:
            console.print(f"  every peer now refuses it: re-issue it with `meshctl certs rotate {e.identity}`")
    console.print(f"recorded in {path}; CRL: {layout.crl}")


@certs.command("crl")
@_certs_dir
@_config
def crl_cmd(certs_dir: Path, config: str | None) -> None:
    """Re-sign CERTS_DIR/ca/crl.pem from mesh.yaml's certificates.revoked (after editing it by hand)."""
    from aivo_mesh.pki.revoke import revoked_serials, write_crl

    mesh = _mesh(config)
    layout = CertLayout(certs_dir)
    _require_ca(layout)
    write_crl(layout, mesh)
    rich_console(WIDTH).print(f"wrote {layout.crl}: {len(revoked_serials(mesh))} revoked serial(s)")
