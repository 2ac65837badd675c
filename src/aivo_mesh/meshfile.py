"""Which mesh.yaml a command reads when it is not given one.

Kept apart from the loader (pydantic, PyYAML) so that a command that only needs the file's name and
text, such as `meshctl apply` handing it to the control plane, does not pay for importing them.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MESH_FILE = "mesh.yaml"
MESH_FILE_ENV = "AIVO_MESH_CONFIG"


def find_mesh_file(path: str | os.PathLike[str] | None = None) -> Path:
    """The explicit path, else $AIVO_MESH_CONFIG, else ./mesh.yaml, else the repo's mesh.yaml."""
    if path is not None:
        return Path(path)
    env = os.environ.get(MESH_FILE_ENV)
    if env:
        return Path(env)
    here = Path(DEFAULT_MESH_FILE)
    if here.exists():
        return here
    for parent in Path(__file__).resolve().parents:
        candidate = parent / DEFAULT_MESH_FILE
        if candidate.exists():
            return candidate
    return here
