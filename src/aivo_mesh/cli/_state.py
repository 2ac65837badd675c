"""`--state-dir`: one option, resolved by one rule (runtime/state.py: resolve_state_dir), for every command
that uses a local mesh's state directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from aivo_mesh.runtime.state import DEFAULT_STATE_DIR, DEMO_STATE_DIR, STATE_DIR_ENV, StateDir, resolve_state_dir

F = TypeVar("F", bound=Callable[..., object])


def state_dir_option(starts: Path | None = None) -> Callable[[F], F]:
    """`--state-dir`, handed to the command as a StateDir. `starts`: the default of a command that starts a
    mesh (`up`, `demo`); without it, the command finds the local mesh running now, else the one started last."""
    if starts is not None:
        fallback = str(starts)
    else:
        fallback = (f"the mesh running from {DEFAULT_STATE_DIR} or {DEMO_STATE_DIR}, else the one of them "
                    "started last")

    def resolve(ctx: click.Context, param: click.Parameter, value: str | None) -> StateDir:
        return resolve_state_dir(value, starts)

    return click.option("--state-dir", type=click.Path(file_okay=False), default=None, callback=resolve,
                        help=f"certificates, logs, pids and spans of the local mesh (default: ${STATE_DIR_ENV}, "
                             f"else {fallback})")
