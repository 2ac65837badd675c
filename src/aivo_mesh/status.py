"""gRPC status names: the vocabulary mesh.yaml, the policy core and telemetry share.

Names, not numbers, so mesh.yaml reads like the gRPC docs; a name's index in `GRPC_STATUS_NAMES` is
its code. Its own module (no pydantic, no grpc) so that config/ and the policy layers both read it
without one depending on the other.
"""

from __future__ import annotations

from typing import Literal, get_args

StatusName = Literal[
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
]
GRPC_STATUS_NAMES: tuple[StatusName, ...] = get_args(StatusName)

# What counts as a failure of the upstream (circuit breaker, outlier detection) unless mesh.yaml's
# `circuit_breaker.failure_codes` says otherwise.
DEFAULT_FAILURE_CODES: tuple[StatusName, ...] = (
    "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "DATA_LOSS",
)
