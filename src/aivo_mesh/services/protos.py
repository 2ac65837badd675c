"""Short names for the generated protobuf / gRPC modules of the four Aivo services.

The generated code lives in ``aivo_mesh.gen.aivo.<package>.v1`` (regenerate it with
``python tools/gen_protos.py``); import it from here rather than spelling that path out::

    from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc
"""

from __future__ import annotations

from aivo_mesh.gen.aivo.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from aivo_mesh.gen.aivo.auth.v1 import auth_pb2, auth_pb2_grpc
from aivo_mesh.gen.aivo.events.v1 import events_pb2, events_pb2_grpc
from aivo_mesh.gen.aivo.learner.v1 import learner_pb2, learner_pb2_grpc

#: Mesh service name -> fully-qualified gRPC service name.
SERVICE_DESCRIPTORS: dict[str, str] = {
    "auth-svc": "aivo.auth.v1.AuthService",
    "learner-svc": "aivo.learner.v1.LearnerService",
    "event-collector-svc": "aivo.events.v1.EventCollectorService",
    "analytics-svc": "aivo.analytics.v1.AnalyticsService",
}

__all__ = [
    "SERVICE_DESCRIPTORS",
    "analytics_pb2",
    "analytics_pb2_grpc",
    "auth_pb2",
    "auth_pb2_grpc",
    "events_pb2",
    "events_pb2_grpc",
    "learner_pb2",
    "learner_pb2_grpc",
]
