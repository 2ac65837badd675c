"""The client side of the proxyless plane."""

from aivo_mesh.client.client import ChannelHandle, MeshClient, UnknownService
from aivo_mesh.client.config import MeshConfig

__all__ = ["ChannelHandle", "MeshClient", "MeshConfig", "UnknownService"]
