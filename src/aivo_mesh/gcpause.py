"""Holding off Python's cyclic garbage collector while a whole mesh's worth of objects is built at once.

Parsing a mesh.yaml, rendering a target or building every sidecar's snapshot allocates hundreds of
thousands of containers that stay reachable until the work is done. The cyclic collector runs after
every 700 net allocations, and each time the heap has grown by a quarter it walks all of it, finding
nothing to free: on a mesh of 1000 services that was half or more of `load_mesh`, and a third or more of
rendering the Envoy bootstraps or the Prometheus files (docs/benchmarks.md). Reference counting still
frees everything as usual; only the search for reference cycles waits until the block ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic collector off for the block, then as it was (left off if it was off already)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
