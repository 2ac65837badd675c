"""`meshctl completion bash|zsh|fish`: the shell's completion script, from click's shell completion.

The script calls meshctl back with `_MESHCTL_COMPLETE=<shell>_complete`; SERVICE arguments complete to
the names mesh.yaml defines (cli/_complete.py), and hidden commands are never offered.
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

from aivo_mesh.cli._root import cli

SHELLS = ("bash", "zsh", "fish")
PROG = "meshctl"
COMPLETE_VAR = "_MESHCTL_COMPLETE"

_INSTALL = {
    "bash": 'eval "$(meshctl completion bash)"   # in ~/.bashrc (bash >= 4.4)',
    "zsh": 'eval "$(meshctl completion zsh)"    # in ~/.zshrc, after compinit',
    "fish": "meshctl completion fish > ~/.config/fish/completions/meshctl.fish",
}


@cli.command("completion", epilog="\b\n" + "\n".join(_INSTALL.values()))
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script of SHELL (bash, zsh or fish): commands, options, and service names
    from mesh.yaml."""
    cls = get_completion_class(shell)
    if cls is None:  # click knows every name in SHELLS; this guards an older click
        raise click.UsageError(f"this click has no {shell} completion")
    click.echo(cls(cli, {}, PROG, COMPLETE_VAR).source())
