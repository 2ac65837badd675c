"""Shell completion of SERVICE arguments: the names mesh.yaml defines (`meshctl completion SHELL`).

mesh.yaml is loaded (config, pydantic) only when the shell asks for a completion, never when a command
that offers one is merely defined.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from click.shell_completion import CompletionItem

from aivo_mesh.errors import MeshError

if TYPE_CHECKING:
    from aivo_mesh.config.model import MeshSpec


def _mesh(ctx: click.Context) -> MeshSpec | None:
    from aivo_mesh.config.loader import find_mesh_file, load_mesh

    # The mesh.yaml the command itself would read: its --config (`config show`: its FILE) when typed
    # before the word completed.
    config = ctx.params.get("config") or ctx.params.get("file")
    try:
        return load_mesh(find_mesh_file(config if isinstance(config, str) else None))
    except (MeshError, OSError):  # a broken mesh.yaml offers nothing rather than a traceback in the shell
        return None


def _items(names: list[str], incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_services(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    mesh = _mesh(ctx)
    return _items(list(mesh.service_names) if mesh else [], incomplete)


def complete_identities(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Services and client identities (mesh-client): every name a certificate is issued for."""
    mesh = _mesh(ctx)
    return _items([*mesh.service_names, *mesh.mesh.clients] if mesh else [], incomplete)
