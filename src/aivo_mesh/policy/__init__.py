"""The policy core: pure Python, no grpc, injected clock (see core.py)."""

from aivo_mesh.policy.core import Call, Clock, Handler, Layer, Reply, build_stack, monotonic
from aivo_mesh.policy.deadline import DeadlineLayer, DeadlineParams, attempt_timeout, effective_timeout

__all__ = [
    "Call",
    "Clock",
    "DeadlineLayer",
    "DeadlineParams",
    "Handler",
    "Layer",
    "Reply",
    "attempt_timeout",
    "build_stack",
    "effective_timeout",
    "monotonic",
]
