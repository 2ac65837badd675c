"""`meshctl check`: everything that must hold before (and while) the mesh runs, as one ✔/✘ list.

Each check says what it looked at and, on ✘ or ⚠, what to do. Exit 1 on any ✘ (⚠ alone: 0), so it
fits CI and a pre-commit hook. The checks, each reusing the command that does it in full:

    config        mesh.yaml loads and validates (`meshctl config validate`)
    lint          mesh.yaml's policies and the rendered Envoy bootstraps (`meshctl lint`)
    certificates  chain, validity, SANs, EKU, revocation, key match and 0600 key modes (`meshctl certs
                  verify`); ⚠ when one expires within --expiry-warn-days
    render        the files under infra/mesh match mesh.yaml (`meshctl render all --check`)
    ports         mesh.yaml's ports are free for `meshctl up` (when no mesh runs from the state dir)
    health        every service of the mesh running from the state dir is SERVING (`meshctl status`)
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import click

from aivo_mesh.cli._output import emit, output_option
from aivo_mesh.cli._root import PORT, cli
from aivo_mesh.cli._state import state_dir_option
from aivo_mesh.errors import MeshError
from aivo_mesh.runtime.state import StateDir

if TYPE_CHECKING:
    from aivo_mesh.config.model import MeshSpec

Status = Literal["ok", "warn", "fail", "skip"]
MARK = {"ok": ("✔", "green"), "warn": ("⚠", "yellow"), "fail": ("✘", "red"), "skip": ("-", "bright_black")}
EXPIRY_WARN_DAYS = 30
OTLP_PORT = 4317  # `meshctl up`'s trace collector, unless --free-ports / --otlp-port


@dataclass
class Check:
    name: str
    status: Status
    detail: str  # what was checked and found
    hint: str = ""  # on fail or warn: what to do


def _first(items: list[str], n: int = 3) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def check_config(config: str | None) -> tuple[Check, MeshSpec | None, Path]:
    from aivo_mesh.config.loader import find_mesh_file, load_mesh

    path = find_mesh_file(config)
    try:
        mesh = load_mesh(path)
    except MeshError as exc:
        return Check("config", "fail", str(exc), f"fix {path} (`meshctl config validate {path}`)"), None, path
    n = len(mesh.services)
    return Check("config", "ok", f"{path}: valid, {n} service{'s' * (n != 1)}, trust domain "
                                 f"{mesh.mesh.trust_domain}"), mesh, path


def check_lint(mesh: MeshSpec, mesh_file: Path) -> Check:
    from aivo_mesh.cli.lint import _lint_file
    from aivo_mesh.lint.envoy import lint_mesh
    from aivo_mesh.render import TARGETS

    found = [(str(mesh_file), i) for i in lint_mesh(mesh)]
    files = sorted((mesh_file.resolve().parent / TARGETS["envoy"].output_dir).glob("*/envoy.yaml"))
    for f in files:
        found += [(str(f), i) for i in _lint_file(f, check_files=False)]
    errors = [i.format(f) for f, i in found if i.severity == "error"]
    warnings = [i.format(f) for f, i in found if i.severity != "error"]
    what = f"mesh.yaml and {len(files)} rendered Envoy bootstrap(s)"
    if errors:
        return Check("lint", "fail", f"{what}: {len(errors)} error(s): {_first(errors, 1)}",
                     "`meshctl lint` lists every finding")
    if warnings:
        return Check("lint", "warn", f"{what}: {len(warnings)} warning(s): {_first(warnings, 1)}",
                     "`meshctl lint` lists every finding")
    return Check("lint", "ok", f"{what}: no findings")


def check_certificates(mesh: MeshSpec, certs_dir: Path, explicit: bool, warn_days: int) -> Check:
    from aivo_mesh.pki import CertLayout, verify_layout

    layout = CertLayout(certs_dir)
    if not layout.root.is_dir():
        create = f"`meshctl certs init -d {certs_dir}` then `meshctl certs issue --all -d {certs_dir}`"
        if explicit:
            return Check("certificates", "fail", f"{certs_dir}: certs directory not found", f"create it: {create}")
        return Check("certificates", "skip", f"no certs directory {certs_dir} (`meshctl up` issues its own in "
                                             f"the state dir; for deployments: {create})")
    reports = verify_layout(layout, mesh)
    bad = [r for r in reports if not r.ok]
    if bad:
        names = " ".join(r.name for r in bad if r.name in mesh.service_names or r.name in mesh.mesh.clients)
        fix = f"`meshctl certs rotate {names} -d {certs_dir}` re-issues them" if names else \
            f"`meshctl certs init --force -d {certs_dir}` replaces the CA (then `certs issue --all`)"
        return Check("certificates", "fail",
                     f"{certs_dir}: {len(bad)} of {len(reports)} certificates have problems: "
                     + _first([f"{r.name}: {r.problems[0]}" for r in bad]),
                     f"`meshctl certs verify -d {certs_dir}` shows every problem; {fix}")
    soon = sorted((r for r in reports if r.days_left is not None and r.days_left < warn_days),
                  key=lambda r: r.days_left or 0)
    what = f"{certs_dir}: {len(reports)} certificates verify (chain, validity, SANs, EKU, keys, 0600 key modes)"
    if soon:
        return Check("certificates", "warn",
                     f"{what}; expiring within {warn_days} days: "
                     + ", ".join(f"{r.name} ({r.days_left} d)" for r in soon),
                     f"`meshctl certs rotate --renew-before-days {warn_days} -d {certs_dir}`")
    left = min((r.days_left for r in reports if r.days_left is not None), default=None)
    return Check("certificates", "ok", what + (f"; the first expires in {left} days" if left is not None else ""))


def check_render(mesh_file: Path) -> Check:
    from aivo_mesh.cli.render import render

    # `render --check` itself, so this check and the command never disagree; its report is captured.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = render.main(["all", "--check", "--config", str(mesh_file)], prog_name="meshctl render",
                               standalone_mode=False)
        except (click.ClickException, MeshError) as exc:
            return Check("render", "fail", f"cannot render: {exc}", "`meshctl render all --check`")
    if code:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith(("drift:", "stale:"))]
        summary = next((ln for ln in reversed(lines) if ln.startswith("drift:")), "rendered files differ")
        stale = [ln.split(" looks generated")[0] for ln in lines if ln.startswith("stale:")]
        differ = [ln[4:] for ln in err.getvalue().splitlines() if ln.startswith("--- ")]  # the diffs' headers
        return Check("render", "fail", summary.removeprefix("drift: ").split("; run ")[0]
                     + (f" ({_first(differ + stale)})" if differ or stale else ""),
                     "`meshctl render all --check` shows the diff; `meshctl render all --prune` rewrites them "
                     "and deletes stale ones")
    return Check("render", "ok", f"files under {mesh_file.resolve().parent / 'infra/mesh'} match mesh.yaml")


def _listens(mesh: MeshSpec, plane: str, otlp_port: int) -> list[tuple[str, int, str]]:
    """(host, port, what) that `meshctl up --plane PLANE` listens on with mesh.yaml's ports."""
    from aivo_mesh.config.ports import sidecar_ports

    metrics = mesh.observability.metrics.host
    found = [("127.0.0.1", otlp_port, "the trace collector")]
    for name in mesh.service_names:
        svc = mesh.service(name)
        if plane == "proxyless":
            found.append((svc.host, svc.port, name))
        else:
            inbound, _, admin = sidecar_ports(mesh, name, "local")
            found += [("127.0.0.1", inbound, f"{name}-envoy inbound"), ("127.0.0.1", admin, f"{name}-envoy admin")]
        if svc.admin_port:
            found.append((metrics, svc.admin_port, f"{name} admin"))
    return found


def check_ports(mesh: MeshSpec, plane: str, otlp_port: int, state: StateDir) -> Check:
    from aivo_mesh.runtime.local import listen_problem
    from aivo_mesh.runtime.state import running_meshes

    listens = _listens(mesh, plane, otlp_port)
    busy = [(port, p) for host, port, what in listens if (p := listen_problem(host, port, what))]
    if not busy:
        return Check("ports", "ok", f"the {len(listens)} ports `meshctl up --plane {plane}` listens on are free")
    # A mesh of ours from another state dir is named once, with how to stop it.
    held = [m for m in running_meshes() if m.root.resolve() != state.root.resolve()
            and {port for port, _ in busy} & m.tcp_ports()]
    hint = f"`meshctl down --state-dir {held[0].root}` stops the mesh holding them, or " if held else \
        f"find the holder with `ss -ltnp 'sport = :{busy[0][0]}'`, or "
    return Check("ports", "fail", f"{len(busy)} of {len(listens)} ports in use: {_first([p for _, p in busy])}",
                 hint + "`meshctl up --free-ports` picks other ports")


def check_health(state: StateDir) -> list[Check]:
    import asyncio

    from aivo_mesh.runtime.state import RuntimeInfo
    from aivo_mesh.runtime.status import gather

    info = RuntimeInfo.read(state)
    if info is None:
        return [Check("health", "skip", f"the mesh running from {state.root} has no supervisor (a `meshctl demo`"
                                        "): `meshctl status` lists its processes")]
    checks = []
    for row in asyncio.run(gather(state)):
        problems = [] if row.process == "running" else [f"process {row.process}"]
        if row.health != "SERVING":
            problems.append(f"health {row.health}")
        if info.plane == "sidecar" and row.sidecar != "LIVE":
            problems.append(f"sidecar {row.sidecar}")
        if info.control_plane and not row.xds.startswith("synced"):
            problems.append(f"xds {row.xds}")
        facts = f"{row.service}: process {row.process}, health {row.health}" + \
            (f", sidecar {row.sidecar}" if info.plane == "sidecar" else "") + \
            (f", xds {row.xds}" if info.control_plane else "")
        checks.append(Check("health", "fail" if problems else "ok", facts,
                            f"see {state.log_file(row.service)} and `meshctl status --state-dir {state.root}`"
                            if problems else ""))
    return checks


def run_checks(config: str | None, certs_dir: Path, certs_explicit: bool, state: StateDir, plane: str,
               otlp_port: int, warn_days: int) -> list[Check]:
    first, mesh, mesh_file = check_config(config)
    checks = [first]
    try:
        running = state.running()
    except MeshError as exc:  # an unreadable processes.json: say so, and check the rest
        checks.append(Check("state", "fail", str(exc), f"`meshctl down --state-dir {state.root}`"))
        running = False
    if mesh is None:
        need = "needs a valid mesh.yaml"
        checks += [Check(n, "skip", need) for n in ("lint", "certificates", "render", "ports")]
    else:
        checks += [check_lint(mesh, mesh_file), check_certificates(mesh, certs_dir, certs_explicit, warn_days),
                   check_render(mesh_file)]
        if running:
            checks.append(Check("ports", "skip", f"a mesh runs from {state.root}: its ports are in use by it"))
        else:
            checks.append(check_ports(mesh, plane, otlp_port, state))
    if running:
        checks += check_health(state)
    else:
        checks.append(Check("health", "skip", f"no mesh running from {state.root} (`meshctl up` starts one)"))
    return checks


@cli.command("check")
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="mesh.yaml (default: $AIVO_MESH_CONFIG, else ./mesh.yaml, else the repository's)")
@click.option("--certs-dir", "-d", "certs_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="certs directory to verify (default: ./certs, skipped when it does not exist)")
@state_dir_option()
@click.option("--plane", type=click.Choice(["sidecar", "proxyless"]), default="sidecar", show_default=True,
              help="whose ports must be free (those `meshctl up --plane PLANE` listens on)")
@click.option("--otlp-port", type=PORT, default=OTLP_PORT, show_default=True,
              help="the trace collector's port, as given to `meshctl up --otlp-port`")
@click.option("--expiry-warn-days", type=click.IntRange(min=0), default=EXPIRY_WARN_DAYS, show_default=True,
              help="warn (⚠) when a certificate expires within this many days")
@output_option
def check(config: str | None, certs_dir: Path | None, state_dir: StateDir, plane: str, otlp_port: int,
          expiry_warn_days: int, output: str) -> None:
    """Check config, lint, certificates, rendered files, ports and, when a mesh runs, its health: one ✔/✘
    line each; exit 1 on any ✘ (⚠ are warnings)."""
    checks = run_checks(config, certs_dir or Path("certs"), certs_dir is not None, state_dir, plane, otlp_port,
                        expiry_warn_days)
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    if output != "text":
        emit({"ok": not failed, "state_dir": str(state_dir.root), "checks": [asdict(c) for c in checks]}, output)
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark, color = MARK[c.status]
            click.echo(f"{click.style(mark, fg=color)} {c.name:<{width}}  {c.detail}")
            if c.hint:
                click.echo(f"  {' ' * width}  → {c.hint}")
        summary = (f"{failed} check(s) failed" if failed else "all checks passed") + \
            (f", {warned} warning(s)" if warned else "")
        click.secho(summary, fg="red" if failed else "yellow" if warned else "green")
    if failed:
        raise click.exceptions.Exit(1)
