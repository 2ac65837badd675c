"""A package's names imported from its modules on first use (PEP 562 `__getattr__`), so that importing
the package costs only what its callers use (aivo_mesh.pki without `cryptography`, aivo_mesh.discovery
without the Consul client and dnspython)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, where: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """The module `__getattr__` of `package`: name -> its module (of `package`) in `where`, imported on first
    use and then kept in `namespace` (the package's globals), so later lookups do not come back here."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:  # also how `from package import submodule` finds a submodule
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
