"""Rendered data (the JSON mapping of a protobuf message, as Envoy's YAML is written) into the typed message.

`parse(doc, cls)` gives what `json_format.ParseDict(doc, cls())` gives, several times faster: one walk over
the data, with a plan per message type made once, that only converts what the JSON mapping spells
differently from the message's own constructor (an `Any` with its `@type`, a duration or timestamp as a
string, a wrapper as a bare value, bytes as base64); the message is then built by its constructor, in C.
ParseDict walks every field in Python and formats a path for each, which made it most of the control
plane's snapshot build.

The walk takes only the subset of the mapping the renderers write: proto field names, values of the
field's own type, no nulls, at most one field of a oneof, and no Struct, Value, ListValue or FieldMask.
Anything else (a camelCase name, an integer written as a string, a misspelt field, a wrong type) goes to
ParseDict itself, so what it accepts, and the error it raises naming the field, are its own. (One check of
ParseDict's is not made: nesting deeper than 100 messages. Rendered resources nest about a dozen deep.)

Every Any holds its message's deterministic serialization, whichever way it was parsed (ParseDict's
result is repacked, `canonicalize`): ParseDict packs a map's entries (a route's RBAC policies) in the order
of the process's hash table, so the bytes, and the control plane's content-hash versions with them
(xds/cache.py), would change from one process to the next.

`ParseMemo` is `parse` for many documents of one kind that differ in a few values (the control plane's
per-sidecar resources): the first is parsed, and each later one is compared with it (in C) and made by
copying its message and setting only the fields where the two differ, each as `parse` reads it.
"""

from __future__ import annotations

import base64
import copy
import functools
import marshal
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar, cast

from google.protobuf import any_pb2, descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

T = TypeVar("T", bound=Message)


class _Elsewhere(Exception):
    """Outside the subset: ParseDict decides."""


# How a field's JSON value becomes a constructor argument. The first four are taken as they are, when of a
# type ParseDict takes as that scalar (the field's plan holds those types).
_STR, _INT, _ENUM, _BOOL, _FLOAT, _FLOAT32, _BYTES, _MESSAGE, _ANY, _FROM_STRING, _WRAPPER = range(11)
_AS_IS = {_STR: frozenset({str}), _INT: frozenset({int}), _ENUM: frozenset({str, int}), _BOOL: frozenset({bool})}
_SINGLE, _REPEATED, _MAP = range(3)

_INTS = frozenset({FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
                   FieldDescriptor.CPPTYPE_UINT64})
_FROM_STRING_TYPES = frozenset({"google.protobuf.Duration", "google.protobuf.Timestamp"})
# Well-known types with a JSON form of their own that this walk leaves to ParseDict (in an Any, all of them).
_ELSEWHERE_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue",
                              "google.protobuf.FieldMask"})
_WRAPPERS_FILE = "google/protobuf/wrappers.proto"
_FLOAT32_MAX = 3.4028234663852886e38

# What the walk does with a field's value: the common cases first, the rest through `_value`.
(_OP_MESSAGE, _OP_AS_IS, _OP_ANY, _OP_FROM_STRING, _OP_VALUE,
 _OP_MESSAGES, _OP_AS_IS_LIST, _OP_VALUES, _OP_MAP) = range(9)

# A field: (op, kind, what the kind needs: accepted types, a message descriptor or class, or a wrapped
# scalar's kind; the oneof it belongs to).
_Field = tuple[int, int, Any, str | None]
_plans: dict[Descriptor, dict[str, _Field]] = {}


def _scalar_kind(field: FieldDescriptor) -> int:
    cpp = field.cpp_type
    if cpp in _INTS:
        return _INT
    if cpp == FieldDescriptor.CPPTYPE_DOUBLE:
        return _FLOAT
    if cpp == FieldDescriptor.CPPTYPE_FLOAT:
        return _FLOAT32
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return _BOOL
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _ENUM
    return _BYTES if field.type == FieldDescriptor.TYPE_BYTES else _STR


def _kind(field: FieldDescriptor) -> tuple[int, Any] | None:
    """None: a type left to ParseDict."""
    if field.cpp_type != FieldDescriptor.CPPTYPE_MESSAGE:
        kind = _scalar_kind(field)
        return kind, _AS_IS.get(kind)
    message = field.message_type
    assert message is not None  # a message field
    name = message.full_name
    if name == "google.protobuf.Any":
        return _ANY, None
    if name in _FROM_STRING_TYPES:
        return _FROM_STRING, GetMessageClass(message)
    if name in _ELSEWHERE_TYPES:
        return None
    if message.file.name == _WRAPPERS_FILE:
        return _WRAPPER, _scalar_kind(message.fields_by_name["value"])
    return _MESSAGE, message


def _op(kind: int, shape: int) -> int:
    if shape == _MAP:
        return _OP_MAP
    if shape == _REPEATED:
        return _OP_MESSAGES if kind == _MESSAGE else _OP_AS_IS_LIST if kind in _AS_IS else _OP_VALUES
    return {_MESSAGE: _OP_MESSAGE, _ANY: _OP_ANY, _FROM_STRING: _OP_FROM_STRING}.get(
        kind, _OP_AS_IS if kind in _AS_IS else _OP_VALUE)


def _plan(descriptor: Descriptor) -> dict[str, _Field]:
    fields: dict[str, _Field] = {}
    for field in descriptor.fields:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if entry.fields_by_name["key"].cpp_type != FieldDescriptor.CPPTYPE_STRING:
                continue  # JSON writes every key as a string: ParseDict converts them
            kind = _kind(entry.fields_by_name["value"])
            shape = _MAP
        else:
            kind = _kind(field)
            shape = _REPEATED if field.is_repeated else _SINGLE
        if kind is not None:
            oneof = field.containing_oneof
            fields[field.name] = (_op(kind[0], shape), kind[0], kind[1], None if oneof is None else oneof.name)
    _plans[descriptor] = fields
    return fields


def _scalar(kind: int, value: Any) -> Any:
    t = type(value)
    if kind in _AS_IS:
        if t in _AS_IS[kind]:
            return value
    elif kind in (_FLOAT, _FLOAT32):
        if (t is float or t is int) and math.isfinite(value) and (kind == _FLOAT or abs(value) <= _FLOAT32_MAX):
            return value
    elif kind == _BYTES and t is str:
        encoded = value.encode()
        return base64.urlsafe_b64decode(encoded + b"=" * (4 - len(encoded) % 4))  # as ParseDict reads it
    raise _Elsewhere


@functools.lru_cache(maxsize=1024)
def _from_string(cls: Callable[[], Message], text: str) -> Message:
    # A handful of distinct durations fill every resource: each is parsed once (and only ever copied).
    message = cls()
    message.FromJsonString(text)  # type: ignore[attr-defined]  # Duration and Timestamp have it
    return message


def _value(kind: int, aux: Any, value: Any) -> Any:
    if kind == _MESSAGE:
        if type(value) is not dict:
            raise _Elsewhere
        return _fields(aux, value)
    if kind == _ANY:
        return _any(value)
    if kind == _FROM_STRING:
        if type(value) is not str:
            raise _Elsewhere
        return _from_string(aux, value)
    if kind == _WRAPPER:
        return {"value": _scalar(aux, value)}
    return _scalar(kind, value)


_packable: dict[str, tuple[Descriptor, Callable[..., Message]]] = {}


def _packable_type(type_url: str) -> tuple[Descriptor, Callable[..., Message]]:
    """The message type an Any of `type_url` holds."""
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_url.rpartition("/")[2])
    except KeyError:
        raise _Elsewhere from None
    if descriptor.full_name in _ELSEWHERE_TYPES | _FROM_STRING_TYPES | {"google.protobuf.Any"} or (
            descriptor.file.name == _WRAPPERS_FILE):
        raise _Elsewhere
    _packable[type_url] = found = descriptor, GetMessageClass(descriptor)
    return found


@functools.lru_cache(maxsize=256)
def _empty_any(type_url: str) -> any_pb2.Any:
    _packable.get(type_url) or _packable_type(type_url)  # a type this walk packs (else ParseDict decides)
    return any_pb2.Any(type_url=type_url)  # an empty message serializes to no bytes (and is only ever copied)


def _any(value: Any) -> any_pb2.Any:
    if type(value) is not dict or not value:
        raise _Elsewhere
    url = value.get("@type")
    if type(url) is not str:
        raise _Elsewhere
    if len(value) == 1:  # a type and nothing else (the router filter, a retry predicate): the same every time
        return _empty_any(url)
    descriptor, cls = _packable.get(url) or _packable_type(url)
    body = dict(value)
    del body["@type"]
    # Deterministic, unlike ParseDict's packing (the module docstring).
    return any_pb2.Any(type_url=url, value=cls(**_fields(descriptor, body)).SerializeToString(deterministic=True))


def _fields(descriptor: Descriptor, doc: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of `descriptor`'s message for `doc`."""
    fields = _plans.get(descriptor)
    if fields is None:
        fields = _plan(descriptor)
    out: dict[str, Any] = {}
    oneofs: set[str] | None = None
    for name, value in doc.items():
        try:
            op, kind, aux, oneof = fields[name]
        except KeyError:
            raise _Elsewhere from None
        if oneof is not None:  # ParseDict refuses two fields of a oneof; the constructor keeps the last
            if oneofs is None:
                oneofs = {oneof}
            elif oneof in oneofs:
                raise _Elsewhere
            else:
                oneofs.add(oneof)
        if op == _OP_AS_IS:  # the most common first
            if type(value) not in aux:
                raise _Elsewhere
            out[name] = value
        elif op == _OP_MESSAGE:
            if type(value) is not dict:
                raise _Elsewhere
            out[name] = _fields(aux, value)
        elif op == _OP_FROM_STRING:
            if type(value) is not str:
                raise _Elsewhere
            out[name] = _from_string(aux, value)
        elif op == _OP_VALUE:
            out[name] = _value(kind, aux, value)
        elif op == _OP_ANY:
            out[name] = _any(value)
        elif op == _OP_MAP:
            if type(value) is not dict:
                raise _Elsewhere
            out[name] = {key: _value(kind, aux, item) for key, item in value.items()}
        elif type(value) is not list:
            raise _Elsewhere
        elif op == _OP_MESSAGES:
            for item in value:
                if type(item) is not dict:
                    raise _Elsewhere
            out[name] = [_fields(aux, item) for item in value]
        elif op == _OP_AS_IS_LIST:
            for item in value:
                if type(item) not in aux:
                    raise _Elsewhere
            out[name] = value
        else:
            out[name] = [_value(kind, aux, item) for item in value]
    return out


def parse(doc: Mapping[str, Any], cls: type[T]) -> T:
    """`doc` as a `cls` message, as `json_format.ParseDict(doc, cls())` reads it (and raising its
    ParseError, which names the field, for what it refuses)."""
    try:
        descriptor = cast(Descriptor, cls.DESCRIPTOR)  # the stubs also name upb's own class
        return cls(**_fields(descriptor, doc if type(doc) is dict else dict(doc)))  # read, never changed
    except Exception:  # _Elsewhere, or a value the constructor refuses: ParseDict says what is wrong
        message = cls()
        json_format.ParseDict(dict(doc), message)
        return canonicalize(message)


_holds_any: dict[str, bool] = {}


def _can_hold_any(descriptor: Descriptor) -> bool:
    """Whether a message of this type can contain an Any, at any depth (worked out once per type)."""
    known = _holds_any.get(descriptor.full_name)
    if known is not None:
        return known
    seen: set[str] = set()
    todo = [descriptor]
    found = False
    while todo and not found:
        d = todo.pop()
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        found = d.full_name == "google.protobuf.Any"
        todo.extend(f.message_type for f in d.fields if f.message_type is not None)
    _holds_any[descriptor.full_name] = found
    return found


def canonicalize(message: T) -> T:
    """`message` with every Any inside it (in place, at any depth) repacked from a deterministic serialization
    of its content, itself canonical. Idempotent."""
    for field, value in message.ListFields():
        sub = field.message_type
        if sub is None or not _can_hold_any(sub):
            continue
        if sub.GetOptions().map_entry:
            if sub.fields_by_name["value"].message_type is None:
                continue
            items = list(value.values())
        else:
            items = list(value) if field.is_repeated else [value]
        for item in items:
            if item.DESCRIPTOR.full_name == "google.protobuf.Any":
                _repack(item)
            else:
                canonicalize(item)
    return message


def _repack(packed: any_pb2.Any) -> None:
    prefix, _, name = packed.type_url.rpartition("/")
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        return  # a type this process does not know: its bytes are kept as they are
    inner = GetMessageClass(descriptor)()
    packed.Unpack(inner)
    packed.Pack(canonicalize(inner), type_url_prefix=prefix + "/", deterministic=True)



# -- documents that differ from one another in a few values ---------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    """`a` and `b` are the same data as `parse` reads it: equal, and of the same types throughout (Python's
    == takes True for 1, 1 for 1.0 and -0.0 for 0.0, which the message, or ParseDict, tells apart)."""
    if a is b:
        return True
    if type(a) is not type(b) or a != b:
        return False
    if type(a) is str:
        return True
    try:  # marshal's version 2 writes each type apart, and (unlike later versions) no shared references
        return marshal.dumps(a, 2) == marshal.dumps(b, 2)
    except ValueError:  # a type marshal does not take (a subclass)
        return False


# The places where documents of one kind differ: a tree of dict keys and list indices, {} at a value.
_Places = dict[Any, "_Places"]


def _differences(was: Any, doc: Any, places: _Places) -> bool:
    """Adds to `places` where `doc` has another value than `was`; False if it differs in more than values
    (keys, their order, a list's length, a value where the other has a dict or a list)."""
    if type(was) is dict:
        if type(doc) is not dict or list(was) != list(doc):
            return False
        items: Any = zip(was, was.values(), doc.values(), strict=True)
    elif type(was) is list:
        if type(doc) is not list or len(was) != len(doc):
            return False
        items = zip(range(len(was)), was, doc, strict=True)
    else:
        return False
    for key, a, b in items:
        if _same(a, b):
            continue
        if type(a) in (dict, list) or type(b) in (dict, list):
            if not _differences(a, b, places.setdefault(key, {})):
                return False
        else:
            places[key] = {}
    return True


def _leaves(places: _Places, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """(the path to a dict or list, the keys of its values at `places`), for `_copy_values`."""
    out = []
    if here := tuple(key for key, sub in places.items() if not sub):
        out.append((path, here))
    for key, sub in places.items():
        if sub:
            out += _leaves(sub, (*path, key))
    return out


def _numbers(doc: Any, places: _Places, path: tuple[Any, ...] = ()
             ) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """(the path to a dict or list, the keys of its numbers, True and False) of `doc` but at `places`."""
    items = doc.items() if type(doc) is dict else enumerate(doc)
    out = []
    if here := tuple(key for key, value in items if isinstance(value, (int, float)) and key not in places):
        out.append((path, here))
    items = doc.items() if type(doc) is dict else enumerate(doc)
    for key, value in items:
        if type(value) in (dict, list) and places.get(key, True) != {}:
            out += _numbers(value, places.get(key, {}), (*path, key))
    return out


def _same_numbers(was: dict[str, Any], doc: dict[str, Any],
                  numbers: list[tuple[tuple[Any, ...], tuple[Any, ...]]]) -> bool:
    """Whether numbers equal as Python compares them (`was == doc`) are of the same types and signs."""
    for path, keys in numbers:
        a: Any = was
        b: Any = doc
        for key in path:
            a, b = a[key], b[key]
        for key in keys:
            x, y = a[key], b[key]
            if type(x) is not type(y) or (type(x) is float and math.copysign(1.0, x) != math.copysign(1.0, y)):
                return False
    return True


def _copy_values(into: dict[str, Any], doc: dict[str, Any],
                 leaves: list[tuple[tuple[Any, ...], tuple[Any, ...]]]) -> None:
    """`doc`'s values at `leaves` into `into` (LookupError, TypeError: `doc` lacks one)."""
    for path, keys in leaves:
        a: Any = into
        b: Any = doc
        for key in path:
            a, b = a[key], b[key]
        for key in keys:
            a[key] = b[key]


# What setting a field at a place takes (`_compile`).
_SET_AS_IS, _SET_DURATION, _SET_FIELD, _IN_MESSAGE, _IN_PATH, _IN_ANY, _IN_MESSAGES, _IN_MAP, _IN_MAP_ANY = range(9)
# A message's fields at places: (field name, what it takes, what that needs, the program within it).
_Program = tuple[tuple[str, int, Any, Any], ...]


def _compile(descriptor: Descriptor, places: _Places, doc: dict[str, Any]) -> _Program:
    """How `_run` sets the fields at `places` of a `descriptor` message read from a document like `doc`,
    worked out once per kind. Raises for a field outside `parse`'s subset (KeyError, _Elsewhere)."""
    fields = _plans.get(descriptor)
    if fields is None:
        fields = _plan(descriptor)
    steps: list[tuple[str, int, Any, Any]] = []
    for name, sub in places.items():
        op, kind, aux, _ = fields[name]
        value = doc[name]
        if sub and op == _OP_MESSAGE:
            within = _compile(aux, sub, value)
            if len(within) == 1 and within[0][1] in (_IN_MESSAGE, _IN_PATH):  # a.b.c: one step, not three
                inner, _, path, further = within[0]
                steps.append((name, _IN_PATH, (inner, *(path or ())), further))
            else:
                steps.append((name, _IN_MESSAGE, None, within))
        elif sub and op == _OP_ANY and "@type" not in sub:
            steps.append((name, _IN_ANY, None, _compile_any(sub, value)))
        elif sub and op == _OP_MESSAGES:
            steps.append((name, _IN_MESSAGES, None, tuple((i, _compile(aux, s, value[i])) for i, s in sub.items())))
        elif sub and op == _OP_MAP and kind == _MESSAGE:
            steps.append((name, _IN_MAP, None, tuple((k, _compile(aux, s, value[k])) for k, s in sub.items())))
        elif sub and op == _OP_MAP and kind == _ANY and not any("@type" in s for s in sub.values()):
            steps.append((name, _IN_MAP_ANY, None, tuple((k, _compile_any(s, value[k])) for k, s in sub.items())))
        elif not sub and op == _OP_AS_IS and kind != _ENUM:
            steps.append((name, _SET_AS_IS, aux, None))
        elif not sub and op == _OP_FROM_STRING:
            steps.append((name, _SET_DURATION, aux, None))
        else:
            steps.append((name, _SET_FIELD, descriptor, None))
    return tuple(steps)


def _compile_any(places: _Places, doc: dict[str, Any]) -> tuple[Callable[[], Message], _Program]:
    descriptor, cls = _packable.get(doc["@type"]) or _packable_type(doc["@type"])
    return cls, _compile(descriptor, places, doc)


def _run_any(packed: any_pb2.Any, doc: dict[str, Any], program: tuple[Callable[[], Message], _Program]) -> None:
    inner = program[0]()
    inner.ParseFromString(packed.value)
    _run(inner, doc, program[1])
    packed.value = inner.SerializeToString(deterministic=True)  # as `_any` packs it


def _run(message: Message, doc: dict[str, Any], program: _Program) -> None:
    """`message`'s fields at the program's places as `parse` reads them from `doc`, the rest as they are."""
    for name, step, aux, within in program:
        value = doc[name]
        if step == _SET_AS_IS:
            if type(value) not in aux:
                raise _Elsewhere
            setattr(message, name, value)
        elif step == _IN_MESSAGE:
            _run(getattr(message, name), value, within)
        elif step == _IN_PATH:
            field = getattr(message, name)
            for key in aux:
                field, value = getattr(field, key), value[key]
            _run(field, value, within)
        elif step == _IN_MESSAGES:
            items = getattr(message, name)
            for i, item_program in within:
                _run(items[i], value[i], item_program)
        elif step == _IN_ANY:
            _run_any(getattr(message, name), value, within)
        elif step == _IN_MAP:
            entries = getattr(message, name)
            for key, entry_program in within:
                _run(entries[key], value[key], entry_program)
        elif step == _IN_MAP_ANY:
            entries = getattr(message, name)
            for key, entry_program in within:
                _run_any(entries[key], value[key], entry_program)
        elif step == _SET_DURATION:
            if type(value) is not str:
                raise _Elsewhere
            field = getattr(message, name)
            field.SetInParent()
            field.CopyFrom(_from_string(aux, value))
        else:  # the whole field as `parse` reads it: a message of this type holding only it, merged in
            message.ClearField(name)
            message.MergeFrom(type(message)(**_fields(aux, {name: value})))


class _Kind:
    """The first document of a kind, its message, and where later ones were seen to differ from it."""

    def __init__(self, doc: dict[str, Any], message: Message) -> None:
        self.doc, self.message = doc, message
        self.places: _Places = {}
        self.leaves: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []
        self.program: _Program = ()
        self.numbers = _numbers(doc, {})

    def learn(self, more: _Places) -> None:
        """Adds places; raises, changing nothing, if a field there is outside `parse`'s subset."""
        places = copy.deepcopy(self.places)
        _merge(places, more)
        self.program = _compile(cast(Descriptor, self.message.DESCRIPTOR), places, self.doc)
        self.places, self.leaves, self.numbers = places, _leaves(places), _numbers(self.doc, places)


class ParseMemo:
    """`parse` for documents of a kind that differ from one another in a few values (every sidecar's
    inbound listener, every peer's cluster): the first of each kind (`like`: the caller's name for it) is
    parsed, and a later one that differs from it in values only, at places where earlier ones differed,
    is a copy of its message with the fields at those places set as `parse` reads them. So a document is
    compared (in C: ==, then its numbers' types) rather than walked. One that differs elsewhere teaches
    the memo those places (a walk over the two); one that differs in more than values (another key, a
    longer list) is parsed. The same message as `parse`, byte for byte, and the same errors.

    Kept for one build (`xds.resources.mesh_snapshots`): it holds the first document of each kind."""

    def __init__(self) -> None:
        self._kinds: dict[Hashable, _Kind] = {}

    def parse(self, doc: Mapping[str, Any], cls: type[T], like: Hashable) -> T:
        kind = self._kinds.get(like)
        if kind is None or type(kind.message) is not cls or type(doc) is not dict:
            message = parse(doc, cls)
            if kind is None and type(doc) is dict:
                first = cls()
                first.CopyFrom(message)  # the caller may change its message
                self._kinds[like] = _Kind(copy.deepcopy(doc), first)
            return message
        try:
            _copy_values(kind.doc, doc, kind.leaves)
            # Python's == takes True for 1, 1 for 1.0 and -0.0 for 0.0, which the message (or ParseDict)
            # tells apart: the numbers are compared apart.
            same = kind.doc == doc and _same_numbers(kind.doc, doc, kind.numbers)
        except (LookupError, TypeError, ValueError):
            same = False
        try:
            if not same:
                more: _Places = {}
                if not _differences(kind.doc, doc, more):
                    return parse(doc, cls)
                kind.learn(more)
            message = cls()
            message.CopyFrom(kind.message)
            _run(message, doc, kind.program)
        except Exception:  # _Elsewhere, or a value the constructor refuses: `parse` says what is wrong
            return parse(doc, cls)
        return message


def _merge(into: _Places, more: _Places) -> None:
    for key, sub in more.items():
        known = into.get(key)
        if known is None or not sub:  # a new place, or the whole value differs
            into[key] = sub
        elif known:  # {}: the whole value differs already
            _merge(known, sub)
