"""mesh.schema.json: a JSON Schema of mesh.yaml, generated from the model, for editors.

    # yaml-language-server: $schema=./mesh.schema.json      (first line of mesh.yaml)

With that line, editors running the YAML language server (VS Code's YAML extension, Neovim, Helix,
JetBrains) complete keys, show each block's description and flag unknown keys, wrong types and
misspelt status names as you type. The schema says what a single key may hold; `meshctl config
validate` stays the authority, as it also checks what spans keys (duplicate ports, unknown callers,
routes of methods the service does not have, back-off max >= base across levels).

The checked-in file is regenerated with `meshctl config schema --write mesh.schema.json` and a test fails
when it drifts from the model.
"""

from __future__ import annotations

import json
from typing import Any

from aivo_mesh.config.model import MeshSpec

SCHEMA_FILE = "mesh.schema.json"
MODELINE = f"# yaml-language-server: $schema=./{SCHEMA_FILE}"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def mesh_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of mesh.yaml: keys as written in the file (`from`, not `from_`)."""
    schema = MeshSpec.model_json_schema(by_alias=True, mode="validation")
    schema.pop("title", None)
    return {"$schema": DIALECT, "title": "aivo-mesh mesh.yaml", **schema}


def mesh_json_schema_text() -> str:
    """The exact text of mesh.schema.json."""
    return json.dumps(mesh_json_schema(), indent=2, ensure_ascii=False) + "\n"
