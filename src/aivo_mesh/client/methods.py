"""What travels on a method: request/response classes from the protobuf descriptor pool.

The client's policy stack picks an endpoint per attempt and sends the attempt on that endpoint's
own channel, so it needs the method's (de)serializers, which grpc.aio does not hand to interceptors.
Every generated protobuf module registers its services in the default pool; we look them up once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from google.protobuf import descriptor_pool, message_factory

from aivo_mesh.errors import MeshError


class UnknownMethod(MeshError):
    """The method is not in any loaded protobuf service."""


@dataclass(frozen=True, slots=True)
class MethodInfo:
    path: str  # "/pkg.Service/Method"
    service: str  # "pkg.Service"
    name: str
    request_type: type[Any]
    response_type: type[Any]
    client_streaming: bool
    server_streaming: bool
    # The caller's own (de)serializers where they are not the message classes' (`with_codec`).
    request_serializer: Callable[[Any], bytes] | None = None
    response_deserializer: Callable[[bytes], Any] | None = None

    @property
    def serialize(self) -> Callable[[Any], bytes]:
        # The class's own C method, as generated stubs pass it: no Python frame per call.
        return self.request_serializer or self.request_type.SerializeToString

    @property
    def deserialize(self) -> Callable[[bytes], Any]:
        return self.response_deserializer or self.response_type.FromString

    def with_codec(self, serialize: Callable[[Any], bytes] | None,
                   deserialize: Callable[[bytes], Any] | None) -> MethodInfo:
        """This method as a caller's `channel.unary_unary(path, request_serializer, response_deserializer)`
        sends it: with the caller's (de)serializers where they are given and are not the message classes'
        (raw bytes, another encoding), else `self`. Generated stubs pass the classes' own."""
        own_ser = serialize is None or serialize == self.request_type.SerializeToString
        own_de = deserialize is None or deserialize == self.response_type.FromString
        if own_ser and own_de:
            return self
        return replace(self, request_serializer=None if own_ser else serialize,
                       response_deserializer=None if own_de else deserialize)


def method_path(grpc_service: str, method: str) -> str:
    """"Authenticate" or "/aivo.auth.v1.AuthService/Authenticate" -> the full path."""
    if method.startswith("/"):
        return method
    return f"/{grpc_service}/{method}"


def service_methods(grpc_service: str) -> list[str]:
    """The paths of `grpc_service`'s methods in the loaded protobuf modules (none when none defines it)."""
    try:
        desc = descriptor_pool.Default().FindServiceByName(grpc_service)
    except KeyError:
        return []
    return [f"/{grpc_service}/{m.name}" for m in desc.methods]


@lru_cache(maxsize=1024)
def lookup(path: str) -> MethodInfo:
    service, _, name = path.lstrip("/").partition("/")
    try:
        desc = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        desc = None
    if desc is None:
        raise UnknownMethod(f"{path}: no loaded protobuf service defines this method "
                            "(import the generated *_pb2 module first)")
    return MethodInfo(
        path=path, service=service, name=name,
        request_type=message_factory.GetMessageClass(desc.input_type),
        response_type=message_factory.GetMessageClass(desc.output_type),
        client_streaming=desc.client_streaming, server_streaming=desc.server_streaming,
    )
