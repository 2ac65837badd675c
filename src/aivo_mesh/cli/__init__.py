"""`meshctl`: one command line for the mesh.

Each command group lives in its own module and registers itself on `cli` (the root group).
Only this package writes files or prints; library modules return values and raise MeshError.
"""

from __future__ import annotations

import sys

import click

from aivo_mesh.cli._root import cli
from aivo_mesh.errors import ConfigError, MeshError, PkiError, StartupError, StateError

# Importing a command module registers its commands on `cli`.
from aivo_mesh.cli import certs as _certs  # noqa: F401  isort: skip
from aivo_mesh.cli import config_cmd as _config  # noqa: F401  isort: skip
from aivo_mesh.cli import serve as _serve  # noqa: F401  isort: skip
from aivo_mesh.cli import render as _render  # noqa: F401  isort: skip
from aivo_mesh.cli import consul_cmd as _consul  # noqa: F401  isort: skip
from aivo_mesh.cli import lint as _lint  # noqa: F401  isort: skip
from aivo_mesh.cli import up as _up  # noqa: F401  isort: skip
from aivo_mesh.cli import check as _check  # noqa: F401  isort: skip
from aivo_mesh.cli import completion as _completion  # noqa: F401  isort: skip
from aivo_mesh.cli import control_plane as _control_plane  # noqa: F401  isort: skip
from aivo_mesh.cli import xds_cmd as _xds  # noqa: F401  isort: skip
from aivo_mesh.cli import observe as _observe  # noqa: F401  isort: skip
from aivo_mesh.cli import dashboard_cmd as _dashboard  # noqa: F401  isort: skip
from aivo_mesh.cli import conformance_cmd as _conformance  # noqa: F401  isort: skip
from aivo_mesh.cli import bench as _bench  # noqa: F401  isort: skip

EXIT_USAGE = 2  # bad input (config, flags, certificates, a port in use, a bad state file): the user must act


def main(argv: list[str] | None = None) -> int:
    """Console entry point: MeshError becomes a message and an exit code, never a traceback."""
    try:
        # standalone_mode=False returns ctx.exit(n) codes instead of raising them.
        rv = cli.main(args=argv, prog_name="meshctl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except (ConfigError, PkiError, StartupError, StateError) as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        return EXIT_USAGE
    except MeshError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
