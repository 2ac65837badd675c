"""The server side of the proxyless plane."""

from aivo_mesh.policy.events import ServerCall, ServerCallObserver
from aivo_mesh.server.authz import Authorizer, peer_identity
from aivo_mesh.server.interceptors import MeshServerInterceptor, current_caller
from aivo_mesh.server.server import MeshServer

__all__ = [
    "Authorizer",
    "MeshServer",
    "MeshServerInterceptor",
    "ServerCall",
    "ServerCallObserver",
    "current_caller",
    "peer_identity",
]
