"""A process-wide choice given as an argument or else an environment variable: `aivo_mesh.run`'s event loop
(AIVO_MESH_EVENT_LOOP) and scheduling policy (AIVO_MESH_SCHEDULING). Light: `run` reads it on every start."""

from __future__ import annotations

import os
from collections.abc import Sequence


def choose(given: str | None, variable: str, choices: Sequence[str], what: str, default: str = "auto") -> str:
    """`given`, else `$variable`, else `default`. A bad argument is a ValueError (the caller's code); a bad
    variable a ConfigError naming it, as every environment problem is (meshctl: exit 2, no traceback)."""
    if given is not None:
        if given not in choices:
            raise ValueError(f"{what} {given!r}: expected one of {', '.join(choices)}")
        return given
    value = os.environ.get(variable) or default
    if value not in choices:
        from aivo_mesh.config.env import ENV_FILE  # only on the error path: it loads the config model
        from aivo_mesh.errors import ConfigError

        raise ConfigError.single(ENV_FILE, variable, f"{value!r}: expected one of {', '.join(choices)}")
    return value
