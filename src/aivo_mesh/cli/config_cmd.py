"""`meshctl config validate|show|schema`: check mesh.yaml, print the configuration in effect, or its JSON Schema."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from aivo_mesh.cli._complete import complete_services
from aivo_mesh.cli._output import emit, output_option
from aivo_mesh.cli._root import cli

if TYPE_CHECKING:
    from aivo_mesh.config.model import MeshSpec

# A service's policy blocks as resolved by `service_policy` (besides its timeout).
_POLICY_BLOCKS = ("retry", "retry_budget", "circuit_breaker", "limits", "outlier_detection", "health_check")


@cli.group("config")
def config() -> None:
    """Check mesh.yaml and show the effective configuration."""


@config.command("validate", short_help="Check mesh.yaml; exit 2 listing every problem.")
@click.argument("file", required=False)
@output_option
def validate(file: str | None, output: str) -> None:
    """Check FILE (default: $AIVO_MESH_CONFIG, else ./mesh.yaml, else the repository's mesh.yaml); exit 2
    listing every problem."""
    from aivo_mesh.config.loader import find_mesh_file, load_mesh

    path = find_mesh_file(file)
    mesh = load_mesh(path)  # ConfigError -> `error: FILE:LINE: PATH: message`, exit 2 (see cli.main)
    if output != "text":
        emit({"file": str(path), "ok": True, "trust_domain": mesh.mesh.trust_domain,
              "services": list(mesh.service_names)}, output)
        return
    n = len(mesh.services)
    click.echo(f"{path}: OK — {n} service{'' if n == 1 else 's'}, trust domain {mesh.mesh.trust_domain}")


@config.command("show", short_help="Print the effective configuration, every default filled in.")
@click.argument("file", required=False)
@click.option("--service", "service", metavar="NAME", shell_complete=complete_services,
              help="Only this service's effective configuration.")
@output_option
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default=None, hidden=True,
              help="former name of -o (yaml, json)")
def show(file: str | None, service: str | None, output: str, fmt: str | None) -> None:
    """Print the effective configuration of FILE (default: $AIVO_MESH_CONFIG, else ./mesh.yaml, else the
    repository's mesh.yaml): every default filled in, the mesh-wide policy layered under each service
    (defaults <- service) and each route (<- route). Text is YAML headed by a comment naming the file."""
    import yaml

    from aivo_mesh.config.loader import find_mesh_file, load_mesh

    if fmt is not None:
        output = fmt
    path = find_mesh_file(file)
    mesh = load_mesh(path)
    data: dict[str, Any]
    if service is not None:
        if service not in mesh.service_names:
            raise click.BadParameter(
                f"unknown service {service!r}: {path} defines {', '.join(mesh.service_names)}",
                param_hint="--service",
            )
        data = effective_service(mesh, service)
    else:
        data = effective_mesh(mesh)
    if output != "text":
        emit(data, output)
    else:
        what = f"service {service} in {path}" if service else str(path)
        click.echo(f"# effective configuration of {what} (defaults <- service <- route)")
        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110).rstrip("\n"))


@config.command("schema", short_help="Print the JSON Schema of mesh.yaml (for editors).")
@click.option("--write", "output", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Write it to FILE instead of standard output (-o means --output format everywhere).")
def schema(output: str | None) -> None:
    """Print the JSON Schema of mesh.yaml, generated from the model. Editors that run the YAML language
    server validate and complete mesh.yaml with it once its first line is
    `# yaml-language-server: $schema=./mesh.schema.json` (docs/config.md)."""
    from aivo_mesh.config.schema import mesh_json_schema_text

    text = mesh_json_schema_text()
    if output is None:
        click.echo(text, nl=False)
        return
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    click.echo(f"wrote {output}")


def effective_mesh(mesh: MeshSpec) -> dict[str, Any]:
    """The whole mesh as plain data, with every default filled in. The result is itself a valid
    mesh.yaml that describes the same mesh."""
    from aivo_mesh.config.model import BUILTIN_DEFAULTS, to_data
    from aivo_mesh.config.resolve import merge

    out = to_data(mesh)
    out["defaults"] = to_data(merge(BUILTIN_DEFAULTS, mesh.defaults))
    out["services"] = [effective_service(mesh, s.name) for s in mesh.services]
    return out


def effective_service(mesh: MeshSpec, name: str) -> dict[str, Any]:
    """One service with its effective policy (`service_policy`) and, per route, `route_policy`."""
    from aivo_mesh.config.model import format_duration, to_data
    from aivo_mesh.config.resolve import service_policy

    policy = service_policy(mesh, name)
    out = to_data(mesh.service(name))
    out["timeout"] = format_duration(policy.timeout)
    for key in _POLICY_BLOCKS:
        out[key] = to_data(getattr(policy, key))
    out["routes"] = [_route(mesh, name, r.match) for r in mesh.service(name).routes]
    return out


def _route(mesh: MeshSpec, service: str, match: str) -> dict[str, Any]:
    from aivo_mesh.config.model import format_duration, to_data
    from aivo_mesh.config.resolve import route_policy

    rp = route_policy(mesh, service, match)
    return {
        "match": match,
        "timeout": format_duration(rp.timeout),
        "retry": to_data(rp.retry),
        "idempotent": rp.idempotent,
        "streaming": rp.streaming,
    }
