"""The order of the client-side policy layers, stated once.

    deadline        sets the overall deadline every other layer honours
    (issue 3 adds: limit, breaker, retry + budget, outlier/picker between deadline and terminal)
    terminal        one attempt on the wire (client/ adapts grpc.aio here)

Outermost first: the deadline must exist before anything waits or retries.
"""

from __future__ import annotations

from collections.abc import Sequence

from aivo_mesh.policy.core import Handler, Layer, build_stack

__all__ = ["Handler", "Layer", "build_stack", "layer_names"]


def layer_names(layers: Sequence[Layer]) -> list[str]:
    return [layer.name for layer in layers]
