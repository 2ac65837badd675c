"""mesh.schema.json: generated from the model, checked in without drift, and as strict as the loader
key by key (it accepts every file the loader accepts and flags the usual mistakes)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from aivo_mesh.config import load_mesh
from aivo_mesh.config.schema import MODELINE, SCHEMA_FILE, mesh_json_schema, mesh_json_schema_text

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / SCHEMA_FILE
MESH_FILES = [ROOT / "mesh.yaml", *sorted((ROOT / "examples").glob("*.yaml"))]
VALIDATOR = Draft202012Validator(json.loads(CHECKED_IN.read_text(encoding="utf-8")),
                                 format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(data: Any) -> list[str]:
    """`path: message` of every error, an `anyOf` (optional blocks are `X | null`) by its branches'."""
    def leaves(error: Any) -> list[Any]:
        return [leaf for sub in error.context for leaf in leaves(sub)] if error.context else [error]

    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for top in VALIDATOR.iter_errors(data) for e in leaves(top)]


def test_the_checked_in_schema_is_the_models() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == mesh_json_schema_text(), (
        f"{SCHEMA_FILE} is out of date with config/model.py: run `meshctl config schema --write {SCHEMA_FILE}`")


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(mesh_json_schema())


@pytest.mark.parametrize("path", MESH_FILES, ids=lambda p: p.name)
def test_shipped_mesh_files_point_editors_at_the_schema_and_pass_it(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert m, f"{path.name}: first line should be {MODELINE!r}"
    assert (path.parent / m.group(1)).resolve() == CHECKED_IN
    load_mesh(path)  # the loader accepts it ...
    assert schema_errors(yaml.safe_load(text)) == []  # ... and so does the schema


MESH: dict[str, Any] = yaml.safe_load((ROOT / "mesh.yaml").read_text(encoding="utf-8"))


def _with(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(MESH)
    change(data)
    return data


@pytest.mark.parametrize(("change", "where"), [
    (lambda d: d.update(keepalve={}), ""),  # a misspelt top-level key
    (lambda d: d["defaults"]["retry"].update(max_retry=3), "defaults.retry"),
    (lambda d: d["services"][0].update(port="50051"), "services.0.port"),
    (lambda d: d["services"][0].update(port=70000), "services.0.port"),
    (lambda d: d["services"][0].update(timeout="soon"), "services.0.timeout"),
    (lambda d: d["defaults"]["retry"].update(retry_on=["UNAVAILBLE"]), "defaults.retry.retry_on.0"),
    (lambda d: d["services"][0].update(name="Auth_Svc"), "services.0.name"),
    (lambda d: d["services"][0]["metadata"].update({"a b": "x"}), "services.0.metadata"),
    (lambda d: d["services"][0]["allow"][0].update(from_=["mesh-client"]), "services.0.allow.0"),
    (lambda d: d.update(linkerd_model="profiles"), "linkerd_model"),
], ids=["unknown key", "nested unknown key", "quoted port", "port range", "duration", "status name",
        "service name", "metadata key", "python spelling of from", "enum"])
def test_the_schema_flags_the_usual_mistakes_where_they_are(change: Any, where: str) -> None:
    errors = schema_errors(_with(change))
    assert errors, "the schema accepted it"
    assert any(e.split(":")[0] == where for e in errors), errors


def test_durations_are_what_the_loader_reads() -> None:
    for value in ("5s", "100ms", "1m", "2h", 5, 0.25, " 5 s "):
        assert schema_errors(_with(lambda d, v=value: d["defaults"].update(timeout=v))) == [], value
    for value in ("5sec", "soon", -1, True, 10**9):
        assert schema_errors(_with(lambda d, v=value: d["defaults"].update(timeout=v))), value


def test_meshctl_config_schema_prints_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from aivo_mesh.cli import main

    assert main(["config", "schema"]) == 0
    assert capsys.readouterr().out == mesh_json_schema_text()
    out = tmp_path / "s.json"
    assert main(["config", "schema", "--write", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == mesh_json_schema_text()
