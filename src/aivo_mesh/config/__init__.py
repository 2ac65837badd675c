"""mesh.yaml: the model, its loader and the effective-policy resolver."""

from aivo_mesh.config.loader import DEFAULT_MESH_FILE, find_mesh_file, load_mesh, parse_mesh
from aivo_mesh.config.model import MeshSpec, RouteSpec, ServiceSpec, format_duration, parse_duration
from aivo_mesh.config.resolve import (
    RoutePolicy,
    ServicePolicy,
    merge,
    policy_for,
    route_policies,
    route_policy,
    service_policy,
)
from aivo_mesh.errors import yaml_path

__all__ = [
    "DEFAULT_MESH_FILE",
    "MeshSpec",
    "RoutePolicy",
    "RouteSpec",
    "ServicePolicy",
    "ServiceSpec",
    "find_mesh_file",
    "format_duration",
    "load_mesh",
    "merge",
    "parse_duration",
    "parse_mesh",
    "policy_for",
    "route_policies",
    "route_policy",
    "service_policy",
    "yaml_path",
]

from aivo_mesh.config.env import ENV_VARS, EnvSettings, apply_env

__all__ += ["ENV_VARS", "EnvSettings", "apply_env"]
