"""`meshctl conformance`: run the conformance suite here, with real processes on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import click

from aivo_mesh.cli._output import emit, output_option
from aivo_mesh.cli._root import cli


@cli.command(short_help="Check that each plane does what mesh.yaml says (real processes on loopback).")
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="the platform's mesh.yaml the scenarios start from (it must define auth-svc and learner-svc)")
@click.option("--scenario", "names", multiple=True, metavar="NAME", help="only these scenarios (repeatable)")
@click.option("--plane", "planes", multiple=True, metavar="PLANE", help="only these planes (repeatable)")
@click.option("--list", "list_only", is_flag=True, help="list the scenarios and planes, run nothing")
@click.option("--docs", "docs", type=click.Path(dir_okay=False, exists=True), default=None,
              help="rewrite the conformance table in this Markdown file (docs/planes.md), run nothing")
@output_option
def conformance(config: str | None, names: tuple[str, ...], planes: tuple[str, ...], list_only: bool,
                docs: str | None, output: str) -> None:
    """Run each scenario of the conformance suite on each plane and compare what the caller saw.

    A scenario is data (a mesh.yaml fragment for auth-svc, what its app does with each attempt, the calls
    learner-svc makes, the outcome expected); the planes are proxyless (from mesh.yaml, and on the control
    plane), Envoy sidecars, both mixes, and gRPC's own xDS client. Where a plane cannot do what mesh.yaml asks,
    the scenario records how it differs, and that is checked too. Needs Envoy (the `envoy` extra). Exit 0
    when every plane behaves as expected, 1 when one does not (its table says how), 2 on bad input."""
    import asyncio
    import tempfile

    import yaml

    from aivo_mesh.conformance.run import run_scenario
    from aivo_mesh.conformance.scenario import PLANES, docs_with_table, load, markdown_table
    from aivo_mesh.meshfile import find_mesh_file
    from aivo_mesh.pki import CertLayout
    from aivo_mesh.pki.issue import init_ca, issue_all

    scenarios = load()
    if docs is not None:
        path = Path(docs)
        try:
            path.write_text(docs_with_table(path.read_text(), markdown_table(scenarios, tuple(PLANES))))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--docs") from None
        click.echo(f"wrote the conformance table into {path}")
        return
    known = {s.name for s in scenarios}
    for name in names:
        if name not in known:
            raise click.BadParameter(f"{name!r}: expected one of {', '.join(sorted(known))}", param_hint="--scenario")
    for plane in planes:
        if plane not in PLANES:
            raise click.BadParameter(f"{plane!r}: expected one of {', '.join(PLANES)}", param_hint="--plane")
    chosen = [s for s in scenarios if not names or s.name in names]
    if list_only:
        data = {"planes": list(PLANES), "scenarios": [{"name": s.name, "summary": s.summary,
                                                       "divergences": [d.reason for d in s.divergences]}
                                                      for s in chosen]}
        if output == "text":
            click.echo("planes: " + ", ".join(PLANES))
            for s in chosen:
                click.echo(f"{s.name}: {s.summary}")
        else:
            emit(data, output)
        return
    from aivo_mesh.config.loader import load_mesh

    mesh_file = find_mesh_file(config)
    mesh = load_mesh(mesh_file)  # a ConfigError names the file and the path (exit 2)
    missing = {"auth-svc", "learner-svc"} - set(mesh.service_names)
    if missing:
        raise click.BadParameter(f"{mesh_file} does not define {', '.join(sorted(missing))}: the scenarios play "
                                 "learner-svc calling auth-svc", param_hint="--config")
    base = yaml.safe_load(mesh_file.read_text())
    runs = []
    with tempfile.TemporaryDirectory(prefix="aivo-conformance-") as work:
        certs = CertLayout(Path(work) / "certs")
        init_ca(certs, mesh.mesh.trust_domain)
        issue_all(certs, mesh)
        for scenario in chosen:
            if output == "text":
                click.echo(f"{scenario.name} ...", err=True)
            run = asyncio.run(run_scenario(scenario, base, certs, Path(work) / scenario.name, planes))
            runs.append(run)
            if output == "text":
                click.echo(run.table())
    passed = all(r.passed for r in runs)
    if output == "text":
        failed = [r.scenario.name for r in runs if not r.passed]
        click.echo(f"scenarios: {len(runs) - len(failed)} as expected on every plane, {len(failed)} not"
                   + (f" ({', '.join(failed)})" if failed else ""))
    else:
        emit({"passed": passed, "scenarios": [r.as_data() for r in runs]}, output)
    if not passed:
        raise click.exceptions.Exit(1)
