"""Reading mesh.yaml: YAML -> MeshSpec, with every error located by file, YAML path and line."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import ValidationError

from aivo_mesh.config.model import MeshSpec, _PathError, _PathErrors
from aivo_mesh.errors import ConfigError, ConfigIssue, nearest_line, yaml_path
from aivo_mesh.gcpause import paused_gc
from aivo_mesh.meshfile import DEFAULT_MESH_FILE, MESH_FILE_ENV, find_mesh_file

__all__ = ["DEFAULT_MESH_FILE", "MESH_FILE_ENV", "find_mesh_file", "load_mesh", "parse_mesh"]


Loc = tuple[str | int, ...]


# More YAML paths than this (after expanding aliases) is not a mesh file but an alias bomb.
MAX_NODES = 200_000
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Index:
    """One walk over the composed document: the problems PyYAML lets through (duplicate keys, keys that
    are not strings, recursive aliases, too many values), and with `lines` the 1-based line of every YAML
    path (only an error needs them: the loader's own, or one a renderer raises later, `MeshSpec.error`)."""

    def __init__(self, root: yaml.Node, *, lines: bool = True) -> None:
        self.lines: dict[Loc, int] = {}
        self.issues: list[ConfigIssue] = []
        self._record = lines
        self._values = 0  # values walked, aliases expanded
        self._active: set[int] = set()  # ids of the nodes on the current path (cycle detection)
        self._walk(root, ())

    def _issue(self, loc: Loc, message: str, node: yaml.Node) -> None:
        self.issues.append(ConfigIssue(yaml_path(loc), message, node.start_mark.line + 1))

    def _walk(self, node: yaml.Node, loc: Loc, *, merged: bool = False) -> None:
        if self._values > MAX_NODES:
            raise ConfigError.single("", yaml_path(loc), f"document too large (more than {MAX_NODES} "
                                     "values after expanding aliases)", node.start_mark.line + 1)
        if not merged:  # a merged mapping's keys are values of the mapping it is merged into
            self._values += 1
        if self._record:
            self.lines.setdefault(loc, node.start_mark.line + 1)
        if id(node) in self._active:
            self._issue(loc, "recursive YAML alias: an anchor cannot contain itself", node)
            return
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                seen: set[str] = set()
                for key, value in node.value:
                    if not isinstance(key, yaml.ScalarNode):
                        self._issue(loc, "mapping keys must be plain strings", key)
                        continue
                    k = key.value
                    if key.tag == _MERGE_TAG:
                        self._walk(value, loc, merged=True)
                        continue
                    if key.tag != _STR_TAG:
                        kind = key.tag.rsplit(":", 1)[-1]
                        self._issue((*loc, k), f"key {k!r} is read as a YAML {kind}, not a string "
                                    "(quote it)", key)
                    elif k in seen:
                        self._issue((*loc, k), "duplicate key (YAML would silently keep the last one)", key)
                    seen.add(k)
                    if self._record:
                        self.lines[(*loc, k)] = key.start_mark.line + 1
                    self._walk(value, (*loc, k))
                    if self._record:
                        self.lines[(*loc, k)] = key.start_mark.line + 1
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    self._walk(item, (*loc, i))
        finally:
            self._active.discard(id(node))


def _line_index(node: yaml.Node) -> dict[Loc, int]:
    """Map every YAML path in the document to its 1-based line."""
    return _Index(node).lines


class _Lines:
    """The line index of a mesh's text, made when first asked for (`MeshSpec.error`): a mesh of a
    thousand services has some 40 000 YAML paths, and most meshes never need the line of one."""

    def __init__(self, text: str) -> None:
        self._text: str | None = text
        self._lines: dict[Loc, int] = {}

    def __call__(self) -> dict[Loc, int]:
        if self._text is not None:
            node = _compose(self._text)[0]  # the text parsed before: it parses again
            self._lines = _line_index(node) if node is not None else {}
            self._text = None
        return self._lines


def _short(value: Any, limit: int = 60) -> str:
    """repr() of a value quoted in a message, cut so a huge input cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(err: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Turn one pydantic error into (location, message saying what was expected) pairs: one, or one per
    cross-reference problem the model found (they are raised together)."""
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, _PathErrors):
        return [(e.loc, str(e)) for e in cause.errors]
    if isinstance(cause, _PathError):
        return [(cause.loc, str(cause))]
    return [_describe_one(err)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# Strict type error -> (what was expected, does a string say it in quotes, e.g. "50051").
_STRICT_EXPECTED: dict[str, tuple[str, Callable[[str], bool]]] = {
    "int_type": ("an integer", lambda t: t.strip().lstrip("+-").isdigit()),
    "bool_type": ("true or false", lambda t: t.strip().lower() in ("true", "false")),
    "float_type": ("a number", _is_number),
}


def _describe_one(err: dict[str, Any]) -> tuple[Loc, str]:
    loc: Loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # Aliased fields report their alias; discriminated unions add the type name as a loc part.
    ctx = err.get("ctx") or {}
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        return loc, "unknown key (check the spelling; see `meshctl config show` for the known keys)"
    if kind == "missing":
        return loc, "required key is missing"
    if kind == "too_short":
        n = ctx.get("min_length")
        return loc, f"expected at least {n} item{'' if n == 1 else 's'}, got {ctx.get('actual_length')}"
    if kind == "literal_error":
        return loc, f"expected one of {ctx.get('expected')}, got {_short(err.get('input'))}"
    if kind in _STRICT_EXPECTED:  # the model's strict scalars (StrictInt, StrictBool, StrictNumber)
        expected, reads_as = _STRICT_EXPECTED[kind]
        got = err.get("input")
        quoted = " (it is quoted: remove the quotes)" if isinstance(got, str) and reads_as(got) else ""
        shown = str(got).lower() if isinstance(got, bool) else _short(got)  # as YAML writes it: true
        return loc, f"expected {expected}, got {shown}{quoted}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind.endswith("_type") or kind.endswith("_parsing"):
        msg = f"{msg.rstrip('.').lower()}; got {_short(err.get('input'))}"
    elif msg.startswith("Input should"):  # range and length checks: say what was written, too
        msg = f"input should{msg[len('Input should'):].rstrip('.')}; got {_short(err.get('input'))}"
    return loc, msg


_YAML_TYPES: dict[type, str] = {list: "list", str: "string", int: "integer", float: "number",
                                bool: "boolean"}


# libyaml when PyYAML was built with it (20x faster; same marks and errors), else pure Python.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _compose(text: str) -> tuple[yaml.Node | None, Any]:
    """Parse once: the node tree (for lines) and the data built from that same tree."""
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def parse_mesh(text: str, file: str = DEFAULT_MESH_FILE) -> MeshSpec:
    """Parse and validate mesh.yaml text. Raises ConfigError and nothing else."""
    with paused_gc():  # the node tree and the data: tens of thousands of objects for a large mesh
        return _parse(text, file)


def _parse(text: str, file: str) -> MeshSpec:
    try:
        node, data = _compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError.single(file, "", f"not valid YAML: {exc.problem or exc}", line) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, e.g. NUL
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        reason = str(exc).splitlines()[0]
        raise ConfigError.single(file, "", f"not valid YAML: {reason}", line) from None
    except yaml.YAMLError as exc:
        raise ConfigError.single(file, "", f"not valid YAML: {exc}") from None
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. unhashable keys, deep nesting
        raise ConfigError.single(file, "", f"not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError.single(file, "", "the file is empty: expected a mapping with at least `services`")
    if not isinstance(data, dict):
        raise ConfigError.single(file, "", f"expected a mapping at the top level, got a YAML "
                                 f"{_YAML_TYPES.get(type(data), type(data).__name__)}", 1)
    if node is None:  # pragma: no cover - data is not None, so there was a document
        raise ConfigError.single(file, "", "the file is empty: expected a mapping with at least `services`")
    try:
        index = _Index(node, lines=False)
    except ConfigError as exc:  # raised before the file name was known
        raise ConfigError(file, exc.issues) from None
    except RecursionError:
        raise ConfigError.single(file, "", "not valid YAML: nested too deeply") from None
    if index.issues:
        raise ConfigError(file, index.issues)
    try:
        spec = MeshSpec.model_validate(data)
    except ValidationError as exc:
        lines = _line_index(node)
        issues = []
        for err in exc.errors(include_url=False):
            for loc, msg in _describe(dict(err)):
                issues.append(ConfigIssue(yaml_path(loc), msg, nearest_line(lines, loc)))
        raise ConfigError(file, issues) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise ConfigError.single(file, "", str(exc)) from None
    spec._source, spec._lines = file, _Lines(text)
    return spec


def load_mesh(path: str | os.PathLike[str] | None = None) -> MeshSpec:
    """Load mesh.yaml from disk. Raises ConfigError (never OSError or a parser exception)."""
    p = find_mesh_file(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError.single(str(p), "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.single(str(p), "", f"cannot read: {exc}") from None
    return parse_mesh(text, str(p))
