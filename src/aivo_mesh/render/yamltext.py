"""YAML text of rendered data: byte for byte what PyYAML's `yaml.dump` writes, several times faster.

PyYAML spends most of a dump in Python (a representer call and a node per value, a resolver call per
scalar) before libyaml writes a byte: 3000 documents of a 1000-service mesh took over 5 s. The renderers
write plain data (dicts in insertion order, lists, str, int, float, bool, None), so `YamlWriter` writes
it directly, in block style, as libyaml's emitter would (`src/emitter.c` of libyaml 0.2.5; the same
rules as PyYAML's own emitter.py for what it takes on), deciding each distinct string's quoting once.

It takes on only what it can show is written the same way: printable ASCII scalars; a string with line
breaks as a literal block (`|`, `|-`, `|2`...) where libyaml would write one; folding of long lines at
the given width; keys shorter than 123 characters. Anything else (other characters, which PyYAML escapes,
a `|+` block, an empty or long key, a tuple, an object seen twice in a document, which PyYAML writes as
an alias) makes the whole document go to PyYAML itself, with the same options.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# libyaml's emitter when PyYAML was built with it: the same text as the Python one, faster.
_SafeDumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _LiteralDumper(_SafeDumper):  # type: ignore[misc]  # a base chosen at import time
    """Block-style YAML with multi-line strings as literal blocks (readable PromQL and PEM)."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_LiteralDumper.add_representer(str, _str)

_QUOTE = "'"
_SIMPLE_KEY_MAX = 123  # a key this long or longer is written as a complex key ("? key") by one emitter
_STR_TAG = "tag:yaml.org,2002:str"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_RESOLVER = yaml.resolver.Resolver()
_ONE_LINE = re.compile(r"[\x20-\x7e]*\Z")
_LINES = re.compile(r"[\x20-\x7e\n]*\Z")
# What keeps a one-line string from being written plain in block context (libyaml's analyze_scalar):
# a document marker, an indicator or a space first; anywhere `: ` or ` #`; a final `:` or space.
_NOT_PLAIN_START = re.compile(r"---|\.\.\.|[#,\[\]{}&*!|>'\"%@` ]|[?:-](?: |\Z)")
# The first characters of the strings the resolver may read as something else ("yes", "1.0", "~"...).
_IMPLICIT_FIRST = frozenset(c for c in yaml.resolver.Resolver.yaml_implicit_resolvers if c is not None)
_WILDCARD = None in yaml.resolver.Resolver.yaml_implicit_resolvers


def _resolved(s: str) -> str:
    """The tag PyYAML's serializer gives `s` written plain (str's, unless it reads as a number, "yes"...)."""
    tag: str = _RESOLVER.resolve(yaml.ScalarNode, s, (True, False))  # type: ignore[no-untyped-call]
    return tag


class _Unsupported(Exception):
    """Data this writer does not take on: the document goes to PyYAML."""


def _inline(s: str) -> str:
    """A one-line string of printable ASCII as a scalar: plain where libyaml writes it plain, else quoted."""
    plain = (bool(s) and not _NOT_PLAIN_START.match(s) and ": " not in s and " #" not in s and s[-1] not in ": "
             and not ((_WILDCARD or s[0] in _IMPLICIT_FIRST) and _resolved(s) != _STR_TAG))
    return s if plain else "'" + s.replace("'", "''") + "'"


def _float(v: float) -> str:
    """SafeRepresenter.represent_float's text, when it reads back as a float (else PyYAML tags it)."""
    if v != v:
        return ".nan"
    if v in (float("inf"), float("-inf")):
        return ".inf" if v > 0 else "-.inf"
    text = repr(v).lower()
    if "." not in text and "e" in text:
        text = text.replace("e", ".0e", 1)
    if _resolved(text) != _FLOAT_TAG:
        raise _Unsupported(text)
    return text


class YamlWriter:
    """Writes documents as `yaml.dump(doc, sort_keys=False, width=width)` does with the SafeDumper, or,
    with `literal_blocks`, with multi-line strings as literal blocks (what `serialize` writes).

    One writer may write many documents: it remembers each distinct string's scalar and each key's.
    """

    def __init__(self, *, literal_blocks: bool, width: int = 120) -> None:
        if width <= 4:  # libyaml and PyYAML take 80 then; nothing here asks for it
            raise ValueError(f"width {width}: expected more than 4")
        self._literal_blocks = literal_blocks
        self._width = width
        self._values: dict[str, str] = {}  # one-line string -> its scalar
        self._keys: dict[str, str] = {}  # key -> "key:"
        self._pads = [""]
        self._seen: set[int] = set()
        self.fallbacks = 0  # documents written by PyYAML (what tests and benchmarks watch)

    def dump(self, doc: Any) -> str:
        """The text of one document."""
        try:
            return self._document(doc)
        except _Unsupported:
            self.fallbacks += 1
            if self._literal_blocks:
                text: str = yaml.dump(doc, Dumper=_LiteralDumper, sort_keys=False, width=self._width)
            else:
                text = yaml.safe_dump(doc, sort_keys=False, width=self._width)
            return text
        finally:
            self._seen.clear()

    def _document(self, doc: Any) -> str:
        out: list[str] = []
        t = type(doc)
        if t is dict:
            self._seen.add(id(doc))
            if not doc:
                return "{}\n"
            self._mapping(doc, 0, "", out)
        elif t is list:
            self._seen.add(id(doc))
            if not doc:
                return "[]\n"
            self._sequence(doc, 0, "", out)
        else:  # a bare scalar: PyYAML may end it with "..."; not what renderers write
            raise _Unsupported(t.__name__)
        return "".join(out)

    def _pads_to(self, indent: int) -> list[str]:
        """Indentation strings, at least up to `indent`."""
        pads = self._pads
        while len(pads) <= indent:
            pads.append(" " * len(pads))
        return pads

    def _key(self, k: Any) -> str:
        """A simple key and its colon."""
        t = type(k)
        if t is str:
            # Empty: PyYAML's emitter and libyaml's disagree. Long: libyaml writes a simple key up to 127
            # characters, PyYAML's own emitter up to 122 (it counts the implicit tag, "!!str", too).
            if not k or len(k) >= _SIMPLE_KEY_MAX or not _ONE_LINE.match(k):
                raise _Unsupported("key")
            text = self._keys[k] = _inline(k) + ":"
            return text
        text = self._scalar(k)
        if len(text) >= _SIMPLE_KEY_MAX:  # an int key of 123 digits or more (PyYAML counts its "!!int" too)
            raise _Unsupported("key")
        return text + ":"

    def _scalar(self, v: Any) -> str:
        """A scalar other than a string."""
        t = type(v)
        if t is int:
            return str(v)
        if t is bool:
            return "true" if v else "false"
        if v is None:
            return "null"
        if t is float:
            return _float(v)
        raise _Unsupported(t.__name__)

    # The two loops below are most of a target's serializing: what they look up is held in locals, and
    # PyYAML's check for an object met twice (an alias) is one set lookup per container.

    def _mapping(self, d: dict[Any, Any], indent: int, first: str, out: list[str]) -> None:
        """A non-empty mapping at `indent`; `first`: what its first line starts with."""
        keys, values, seen, pads = self._keys, self._values, self._seen, self._pads
        deeper = indent + 2
        if len(pads) <= deeper:
            self._pads_to(deeper)
        pad = pads[indent]
        room = self._width - indent  # a key and a string that fit are never folded, nor one without spaces
        append = out.append
        pre = first
        for k, v in d.items():
            kt = keys.get(k) if type(k) is str else None
            if kt is None:
                kt = self._key(k)
            t = type(v)
            if t is str:
                st = values.get(v)
                if st is not None and (len(kt) + len(st) <= room or " " not in st):
                    append(f"{pre}{kt} {st}\n")
                else:
                    self._string(v, pre + kt, deeper, out)
            elif t is dict:
                if id(v) in seen:
                    raise _Unsupported("alias")
                seen.add(id(v))
                if v:
                    append(f"{pre}{kt}\n")
                    self._mapping(v, deeper, pads[deeper], out)
                else:
                    append(f"{pre}{kt} {{}}\n")
            elif t is list:
                if id(v) in seen:
                    raise _Unsupported("alias")
                seen.add(id(v))
                if v:  # a sequence in a mapping is not indented (PyYAML's "indentless" sequence)
                    append(f"{pre}{kt}\n")
                    self._sequence(v, indent, pad, out)
                else:
                    append(f"{pre}{kt} []\n")
            elif t is int:
                append(f"{pre}{kt} {v}\n")
            else:
                append(f"{pre}{kt} {self._scalar(v)}\n")
            pre = pad

    def _sequence(self, seq: list[Any], indent: int, first: str, out: list[str]) -> None:
        """A non-empty sequence whose dashes are at `indent`; `first`: what its first line starts with."""
        values, seen, pads = self._values, self._seen, self._pads
        deeper = indent + 2
        if len(pads) <= deeper:
            self._pads_to(deeper)
        pad = pads[indent]
        room = self._width - indent - 1
        append = out.append
        pre = first
        for v in seq:
            t = type(v)
            if t is str:
                st = values.get(v)
                if st is not None and (len(st) <= room or " " not in st):
                    append(f"{pre}- {st}\n")
                else:
                    self._string(v, pre + "-", deeper, out)
            elif t is dict or t is list:
                if id(v) in seen:
                    raise _Unsupported("alias")
                seen.add(id(v))
                if not v:
                    append(f"{pre}- {{}}\n" if t is dict else f"{pre}- []\n")
                elif t is dict:
                    self._mapping(v, deeper, pre + "- ", out)
                else:
                    self._sequence(v, deeper, pre + "- ", out)
            else:
                append(f"{pre}- {self._scalar(v)}\n")
            pre = pad

    def _string(self, s: str, line: str, indent: int, out: list[str]) -> None:
        """A string value after `line` (up to its `:` or `-`), whose continuation lines are at `indent`:
        a literal block, or one line, folded where it runs past the width."""
        text = self._values.get(s)
        if text is None:
            if "\n" in s:
                self._literal(s, line, indent, out)
                return
            if not _ONE_LINE.match(s):
                raise _Unsupported("characters")
            text = self._values[s] = _inline(s)
        column = len(line) + 1
        if column + len(text) <= self._width + 1 or " " not in text:
            out.append(f"{line} {text}\n")
        else:
            out.append(f"{line} {self._folded(s, text[0] == _QUOTE, column, indent)}\n")

    def _folded(self, s: str, quoted: bool, column: int, indent: int) -> str:
        """A one-line scalar starting at `column`, broken as libyaml's write_plain_scalar and
        write_single_quoted_scalar break it: at a single space (not a run of them; for a quoted one, not
        first or last) met past the width, the line going on at `indent`."""
        width, n = self._width, len(s)
        parts = ["'"] if quoted else []
        col = column + 1 if quoted else column  # the column of s[start]
        start = 0
        pos = s.find(" ")
        while pos != -1:
            written = s[start:pos]
            if quoted:
                written = written.replace("'", "''")
            at = col + len(written)  # the column this space would be written at
            if (at > width and s[pos - 1:pos] != " " and s[pos + 1:pos + 2] != " "
                    and (not quoted or 0 < pos < n - 1)):
                parts += (written, "\n", self._pads_to(indent)[indent])
                col = indent
            else:
                parts += (written, " ")
                col = at + 1
            start = pos + 1
            pos = s.find(" ", start)
        parts.append(s[start:].replace("'", "''") if quoted else s[start:])
        if quoted:
            parts.append("'")
        return "".join(parts)

    def _literal(self, s: str, line: str, indent: int, out: list[str]) -> None:
        """A multi-line string as libyaml writes a literal block: lines at `indent`, empty lines bare."""
        # libyaml writes a double-quoted scalar instead where a line ends in a space, and `|+` (with a
        # "..." after the document) where the string ends in more than one line break.
        if not self._literal_blocks or not _LINES.match(s) or s.endswith((" ", "\n\n")) or " \n" in s \
                or s == "\n":
            raise _Unsupported("multi-line string")
        header = "|" + ("2" if s[0] in " \n" else "") + ("" if s.endswith("\n") else "-")
        pad = self._pads_to(indent)[indent]
        body = s[:-1] if s.endswith("\n") else s
        out.append(f"{line} {header}\n")
        out.append("".join(f"{pad}{ln}\n" if ln else "\n" for ln in body.split("\n")))
