"""The four demo services of the Aivo platform, as ``grpc.aio`` servicers.

``APPS`` maps a mesh service name (as in mesh.yaml) to its ``register(server, ctx)``, which
adds the servicer to a ``grpc.aio.Server`` and returns a :class:`Closeable` that releases its
resources. The mesh server layer provides TLS, caller identity and authorization.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from aivo_mesh.services import analytics, auth, events, learner
from aivo_mesh.services.base import Closeable, PeerChannels, RegisterFn, ServiceContext

APPS: dict[str, Callable[[grpc.aio.Server, ServiceContext], Closeable]] = {
    "auth-svc": auth.register,
    "learner-svc": learner.register,
    "event-collector-svc": events.register,
    "analytics-svc": analytics.register,
}

__all__ = ["APPS", "Closeable", "PeerChannels", "RegisterFn", "ServiceContext"]
