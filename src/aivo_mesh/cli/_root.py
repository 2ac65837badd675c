"""The root `meshctl` group; command modules attach to it."""

from __future__ import annotations

import click

# Every port a meshctl option takes (an int would let `--port 70000` reach the OS, which binds another port).
PORT = click.IntRange(1, 65535)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="aivo-mesh", prog_name="meshctl")
def cli() -> None:
    """aivo-mesh: the Aivo platform's gRPC service mesh."""
