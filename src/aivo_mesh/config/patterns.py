"""What a gRPC method pattern of mesh.yaml means (routes' `match`, allow rules' `methods`).

The model normalises every pattern to one of two spellings (config.model.MethodPattern):

    /pkg.Svc/Method   exactly that method
    /pkg.Svc/         a prefix: every method of the service

Everything that reads a pattern (the resolver, the Authorizer, the renderers) asks these functions
instead of looking at its characters, so the two kinds mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def is_prefix(pattern: str) -> bool:
    """Does `pattern` stand for every method under it (`/pkg.Svc/`), not one method?"""
    return pattern.endswith("/")


def covers(pattern: str, method: str) -> bool:
    """Does `pattern` match `method`? `method` may itself be a pattern: a prefix covers every pattern
    under it, an exact method only itself."""
    return method == pattern or (is_prefix(pattern) and method.startswith(pattern))


def covers_any(patterns: Iterable[str], method: str) -> bool:
    return any(covers(p, method) for p in patterns)


def method_name(pattern: str) -> str:
    """`/pkg.Svc/Method` -> `Method`; a prefix has none (`""`)."""
    return pattern.rsplit("/", 1)[-1]


def service_name(pattern: str) -> str:
    """`/pkg.Svc/Method` and `/pkg.Svc/` -> `pkg.Svc`."""
    return pattern.strip("/").partition("/")[0]


def service_prefix(grpc_service: str) -> str:
    """The pattern of every method of `grpc_service`."""
    return f"/{grpc_service}/"


def specificity(pattern: str) -> tuple[int, int]:
    """Sort key of match order: exact methods first, then prefixes, longer before shorter. The sort
    is stable, so equally specific patterns keep their mesh.yaml order."""
    return (1, -len(pattern)) if is_prefix(pattern) else (0, 0)


def in_match_order(items: Iterable[T], pattern: Callable[[T], str]) -> list[T]:
    """`items` in the order a request is matched against their patterns: the first that covers wins."""
    return sorted(items, key=lambda item: specificity(pattern(item)))
