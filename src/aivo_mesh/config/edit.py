"""Small edits of a user's mesh.yaml that keep every comment and every other byte as it was.

Commands that write to mesh.yaml (`meshctl certs revoke`, `certs rotate --revoke-previous`) must not
re-serialize the whole document: that would drop the comments people keep there. An edit inserts text at
positions taken from the YAML node marks, then the result is parsed again (`parse_mesh`): an edit that
would leave an invalid or different document raises ConfigError and nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import yaml

from aivo_mesh.config.loader import parse_mesh
from aivo_mesh.config.model import MeshSpec, normalize_serial
from aivo_mesh.errors import ConfigError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _flow(fields: Mapping[str, str]) -> str:
    # One line per entry, values JSON-quoted (valid YAML double-quoted scalars), whatever they hold.
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"


def _key(mapping: yaml.MappingNode, name: str) -> tuple[yaml.Node, yaml.Node] | None:
    for k, v in mapping.value:
        if isinstance(k, yaml.ScalarNode) and k.value == name:
            return k, v
    return None


def _after(text: str, node: yaml.Node) -> int:
    """Where text may be inserted after a node: the start of the line after its last content. (A block
    collection's own end mark is where the next token starts, past comments and indentation.)"""
    while isinstance(node, yaml.MappingNode | yaml.SequenceNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(last, tuple) else last
    nl = text.find("\n", node.end_mark.index)
    return len(text) if nl < 0 else nl + 1


def _items(entries: Sequence[Mapping[str, str]], indent: int) -> str:
    return "".join(f"{' ' * indent}- {_flow(e)}\n" for e in entries)


def append_to_list(text: str, section: str, key: str, entries: Sequence[Mapping[str, str]],
                   file: str = "mesh.yaml") -> str:
    """`text` with `entries` appended to the list at `section.key` (created when missing)."""
    if not entries:
        return text
    root = yaml.compose(text, Loader=_Loader)
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError.single(file, "", "expected a mapping at the top of the document")
    found = _key(root, section)
    body = text if text.endswith("\n") else text + "\n"
    if found is None:
        return body + f"{section}:\n  {key}:\n" + _items(entries, 4)
    sec_key, sec = found
    empty = (isinstance(sec, yaml.ScalarNode) and sec.value in ("", "~", "null")) or (
        isinstance(sec, yaml.MappingNode) and sec.flow_style and not sec.value)
    if empty:  # `certificates:` or `certificates: {}`
        start, end = sec_key.end_mark.index, sec.end_mark.index
        return text[:start] + f":\n  {key}:\n" + _items(entries, 4) + text[end:].lstrip(" ").removeprefix("\n")
    if not isinstance(sec, yaml.MappingNode) or sec.flow_style or not sec.value:
        raise ConfigError.single(file, section, f"expected a block mapping to add {key} to; write `{section}:` "
                                                "with its keys on their own lines")
    indent = sec.value[0][0].start_mark.column
    inner = _key(sec, key)
    if inner is None:
        at = _after(text, sec)
        return text[:at] + f"{' ' * indent}{key}:\n" + _items(entries, indent + 2) + text[at:]
    inner_key, seq = inner
    if isinstance(seq, yaml.ScalarNode) and seq.value in ("", "~", "null"):
        start, end = inner_key.end_mark.index, seq.end_mark.index
        return text[:start] + ":\n" + _items(entries, indent + 2) + text[end:].lstrip(" ").removeprefix("\n")
    if not isinstance(seq, yaml.SequenceNode):
        raise ConfigError.single(file, f"{section}.{key}", "expected a list")
    if seq.flow_style:
        if seq.value:
            raise ConfigError.single(file, f"{section}.{key}", "is a one-line [..] list: write it one item per "
                                                               "line (`- ...`) so entries can be added")
        start, end = inner_key.end_mark.index, seq.end_mark.index
        rest = text[end:]
        return text[:start] + ":\n" + _items(entries, indent + 2) + rest.removeprefix("\n")
    item_indent = seq.start_mark.column
    at = _after(text, seq.value[-1])
    return text[:at] + _items(entries, item_indent) + text[at:]


def add_revocations(text: str, entries: Sequence[Mapping[str, str]], file: str = "mesh.yaml") -> tuple[str, MeshSpec]:
    """mesh.yaml text with `entries` added to `certificates.revoked`, and the mesh it now describes.

    Entries already listed (same serial, or same SPKI without a serial) are skipped. Raises ConfigError
    if the result does not load, naming the file."""
    mesh = parse_mesh(text, file)
    entries = [{**e, "serial": normalize_serial(e["serial"])} if e.get("serial") else dict(e) for e in entries]
    have_serials = {r.serial for r in mesh.certificates.revoked if r.serial}
    have_spki = {r.spki for r in mesh.certificates.revoked if r.spki and not r.serial}
    new = [e for e in entries
           if not (e.get("serial") and e["serial"] in have_serials)
           and not (not e.get("serial") and e.get("spki") in have_spki)]
    edited = append_to_list(text, "certificates", "revoked", new, file)
    result = parse_mesh(edited, file)  # raises ConfigError: the caller writes nothing
    if len(result.certificates.revoked) != len(mesh.certificates.revoked) + len(new):
        raise ConfigError.single(file, "certificates.revoked", "the edit did not add the entries as expected; "
                                                               "add them by hand")
    return edited, result
