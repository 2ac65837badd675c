"""`meshctl render TARGET|all [--output-dir DIR] [--check]`: write (or check) rendered files."""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path

import click

from aivo_mesh.cli._root import cli
from aivo_mesh.config.loader import find_mesh_file, load_mesh
from aivo_mesh.render import TARGETS, render_target

REPO_ROOT_MARKER = "mesh.yaml"


def _write(path: Path, text: str) -> bool:
    """Atomic write; returns True when the content changed."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


@cli.command()
@click.argument("target", type=click.Choice([*TARGETS, "all"]))
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="mesh.yaml")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="where to write (default: the target's directory under infra/mesh/, next to mesh.yaml)")
@click.option("--check", is_flag=True, help="write nothing; exit 1 if the files on disk differ (drift)")
def render(target: str, config: str | None, output_dir: str | None, check: bool) -> None:
    """Render TARGET (envoy, linkerd, consul, compose, prometheus, grafana, or all) from mesh.yaml."""
    mesh_file = find_mesh_file(config)
    mesh = load_mesh(mesh_file)
    base = mesh_file.resolve().parent
    names = list(TARGETS) if target == "all" else [target]
    if output_dir is not None and len(names) > 1:
        raise click.UsageError("--output-dir needs a single target")
    drift: list[str] = []
    for name in names:
        out = Path(output_dir) if output_dir else base / TARGETS[name].output_dir
        files = render_target(name, mesh)
        for rel, text in files.items():
            path = out / rel
            if check:
                current = path.read_text() if path.exists() else ""
                if current != text:
                    drift.append(str(path))
                    diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(path),
                                                f"{path} (rendered)", lineterm="", n=1)
                    click.echo("\n".join(list(diff)[:40]), err=True)
            elif _write(path, text):
                click.echo(f"wrote {path}")
        if not check:
            click.echo(f"{name}: {len(files)} files in {out}")
    if check:
        if drift:
            click.secho(f"drift: {len(drift)} rendered files differ from mesh.yaml; run `meshctl render "
                        f"{target}`", fg="red", err=True)
            raise click.exceptions.Exit(1)
        click.echo(f"{', '.join(names)}: rendered files match mesh.yaml")
