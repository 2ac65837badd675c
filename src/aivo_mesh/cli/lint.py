"""`meshctl lint [FILE|DIR ...] [--check-files/--no-check-files]`: lint Envoy bootstraps.

Catches what `envoy --mode validate` accepts but is wrong (aivo_mesh.lint.envoy). With no
argument it lints the rendered sidecars (`infra/mesh/envoy/*/envoy.yaml` next to mesh.yaml) and
mesh.yaml's retry policies the sidecars cannot express. Prints ``file: path: severity: message``
(or, with -o json|yaml, the same findings as data); exit 1 when there is an error, 0 with warnings
alone, 2 on bad usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from aivo_mesh.cli._output import emit, output_option
from aivo_mesh.cli._root import cli

if TYPE_CHECKING:
    from aivo_mesh.lint.envoy import LintIssue


def _expand(paths: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(p.rglob("envoy.yaml"))
            if not found:
                raise click.UsageError(f"{p}: no envoy.yaml under this directory")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise click.UsageError(f"{p}: no such file or directory")
    return list(dict.fromkeys(files))


def _lint_file(path: Path, check_files: bool) -> list[LintIssue]:
    import yaml

    from aivo_mesh.lint.envoy import LintIssue, lint_bootstrap, load_config

    try:
        config = load_config(path)
    except (OSError, UnicodeDecodeError) as exc:
        return [LintIssue("", "error", f"cannot read: {exc}")]
    except yaml.YAMLError as exc:
        return [LintIssue("", "error", f"not valid YAML/JSON: {exc}")]
    return lint_bootstrap(config, file=str(path), check_files=check_files)


@cli.command("lint")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--check-files/--no-check-files", default=False, show_default=True,
              help="also check that the SDS files, secrets, certificates and keys named exist "
                   "(use where Envoy runs: the rendered pod files name /etc/envoy/...)")
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="mesh.yaml (locates the default files and is linted with them)")
@click.option("--grpc-xds", is_flag=True, default=False,
              help="also warn of what gRPC's built-in xDS client (plain grpc with xds:/// targets) does not apply")
@output_option
def lint(paths: tuple[str, ...], check_files: bool, config: str | None, grpc_xds: bool, output: str) -> None:
    """Lint Envoy bootstraps (FILEs, or every envoy.yaml under DIRs; default: the rendered sidecars)."""
    from aivo_mesh.config.loader import find_mesh_file, load_mesh
    from aivo_mesh.lint.envoy import lint_mesh
    from aivo_mesh.render import TARGETS

    results: list[tuple[str, LintIssue]] = []
    if paths:
        files = _expand(paths)
    else:
        mesh_file = find_mesh_file(config)
        mesh = load_mesh(mesh_file)
        results += [(str(mesh_file), issue) for issue in lint_mesh(mesh, grpc_xds=grpc_xds)]
        out_dir = mesh_file.resolve().parent / TARGETS["envoy"].output_dir
        files = sorted(out_dir.glob("*/envoy.yaml"))
        if not files:
            raise click.UsageError(f"no {out_dir}/*/envoy.yaml: run `meshctl render envoy` first")
    for f in files:
        results += [(str(f), issue) for issue in _lint_file(f, check_files)]
    errors = sum(1 for _, i in results if i.severity == "error")
    warnings = len(results) - errors
    if output != "text":
        emit({"files": [str(f) for f in files], "ok": not errors, "errors": errors, "warnings": warnings,
              "issues": [{"file": file, "path": i.path, "severity": i.severity, "message": i.message}
                         for file, i in results]}, output)
        if errors:
            raise click.exceptions.Exit(1)
        return
    for file, issue in results:
        click.echo(issue.format(file))
    summary = f"{len(files)} file(s): {errors} error(s), {warnings} warning(s)"
    if errors:
        click.secho(summary, fg="red", err=True)
        raise click.exceptions.Exit(1)
    click.secho(summary, fg="yellow" if warnings else "green", err=True)
