"""`-o/--output text|json|yaml`: one option and one printer for every command that prints data, and the
one rich console the commands render text with.

A command builds one plain-data structure (dicts, lists, str, int, float, bool, None) whose keys do not
depend on the state it finds (an empty list, a null, never a missing key), then either prints it with
`emit` (json, yaml) or renders it for people (text).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., object])

FORMATS = ("text", "json", "yaml")


def output_option(f: F) -> F:
    """`-o/--output`, handed to the command as `output`."""
    return click.option("-o", "--output", "output", type=click.Choice(FORMATS), default="text", show_default=True,
                        help="text for people; json or yaml: the same data, one schema whatever the state")(f)


def json_alias_option(f: F) -> F:
    """The former `--json` flag, kept (hidden) for scripts; `pick_output` folds it into `--output`."""
    return click.option("--json", "as_json", is_flag=True, hidden=True, help="same as -o json")(f)


def pick_output(output: str, as_json: bool) -> str:
    if not as_json:
        return output
    ctx = click.get_current_context()
    if ctx.get_parameter_source("output") is not click.core.ParameterSource.DEFAULT and output != "json":
        raise click.UsageError(f"--json means -o json, not -o {output}: drop one of them")
    return "json"


def emit(data: Any, output: str) -> None:
    """Print `data` as JSON or YAML (the same structure either way)."""
    if output == "json":
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    elif output == "yaml":
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False,
                                  width=1000).rstrip("\n"))
    else:  # a command renders text itself
        raise ValueError(f"emit: {output!r} is not a data format")


def rich_console(width: int = 160) -> Console:
    """A rich console. Not a terminal (pipes, CI logs, tests): `width` columns, so tables stay readable
    (rich would take 80)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=width)
