"""The platform's documented import path for the mesh client.

    from infra.mesh.python.mesh_client import MeshClient, MeshConfig

This module only re-exports aivo_mesh's public client API; it holds no code of its own.
"""

from aivo_mesh import MeshClient, MeshConfig

__all__ = ["MeshClient", "MeshConfig"]
