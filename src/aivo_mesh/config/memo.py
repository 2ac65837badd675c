"""What is derived from a mesh, computed once per mesh object.

The model is frozen, so whatever is computed from it (a service's resolved policy, who may call whom, the
one-machine port plan) is the same each time it is asked for; a renderer or the control plane asks
once per service, or once per caller of each peer. `per_mesh` keeps each result with the mesh object it
came from:

- keyed by the object's identity, never by its contents: hashing a whole mesh would cost more than most
  of what is kept, and a mesh holds dicts (`metadata`), which do not hash;
- dropped when that object is collected (before its id can be reused);
- never shared with a copy: `model_copy(update=...)` makes a new object, which starts empty. (A cache in
  a private attribute would not do: pydantic copies private attributes into the copy, so an updated
  copy would read results of the mesh it was copied from.)

Results are shared between callers: they must be immutable (tuples, frozen models and dataclasses), or
handed out as copies.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M")

_results: dict[int, dict[Hashable, Any]] = {}


def _forget(key: int) -> None:
    _results.pop(key, None)


def _results_of(mesh: object) -> dict[Hashable, Any]:
    key = id(mesh)
    found = _results.get(key)
    if found is None:
        # The finalizer first: for an object it cannot watch (TypeError), nothing is kept under an id
        # that another object could take after this one is gone.
        weakref.finalize(mesh, _forget, key)
        found = _results[key] = {}
    return found


def per_mesh(fn: Callable[Concatenate[M, P], R]) -> Callable[Concatenate[M, P], R]:
    """`fn(mesh, *args)` computed once per mesh object and arguments (which must hash); an exception is
    not kept (the next call raises it again)."""

    @functools.wraps(fn)
    def cached(mesh: M, /, *args: P.args, **kwargs: P.kwargs) -> R:
        results = _results_of(mesh)
        key = (fn, args, tuple(sorted(kwargs.items()))) if kwargs else (fn, args)
        try:
            found: R = results[key]
        except KeyError:
            found = results[key] = fn(mesh, *args, **kwargs)
        return found

    return cached


def cached_meshes() -> int:
    """How many mesh objects have results kept (tests: a collected mesh leaves nothing behind)."""
    return len(_results)
