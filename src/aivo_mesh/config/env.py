"""Deployment settings from environment variables, and how they override mesh.yaml.

The platform's services are deployed with a handful of variables (see `ENV_VARS`), plus the standard
OpenTelemetry ones for tracing (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER[_ARG]).
They are read once, checked, and applied to one service of the mesh with `apply_env`; mesh.yaml stays
the single description of everything else. Every problem is a ConfigError whose file is `environment` and whose
path is the variable's name, e.g. `environment: GRPC_PORT: expected an integer port 1-65535, got 'abc'`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from aivo_mesh.config.loader import _describe
from aivo_mesh.config.model import POD_SCOPE, SERVICE_NAME, TRACES_SAMPLERS, MeshSpec
from aivo_mesh.errors import ConfigError, ConfigIssue, yaml_path

ENV_FILE = "environment"
OTLP_GRPC_PORT = 4317

# Variable -> EnvSettings field.
ENV_VARS: dict[str, str] = {
    "SERVICE_NAME": "service_name",
    "SERVICE_VERSION": "service_version",
    "GRPC_PORT": "grpc_port",
    "LOCAL_SERVICE_PORT": "local_service_port",
    "CA_CERT_PATH": "ca_cert_path",
    "CLIENT_CERT_PATH": "client_cert_path",
    "CLIENT_KEY_PATH": "client_key_path",
    "JAEGER_HOST": "jaeger_host",
    "METRICS_HOST": "metrics_host",
    # The OpenTelemetry SDK's own variables (opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables):
    # a platform that sets them for every workload gets the same behaviour from the mesh's processes.
    "OTEL_EXPORTER_OTLP_ENDPOINT": "otel_exporter_otlp_endpoint",
    "OTEL_SERVICE_NAME": "otel_service_name",
    "OTEL_TRACES_SAMPLER": "otel_traces_sampler",
    "OTEL_TRACES_SAMPLER_ARG": "otel_traces_sampler_arg",
}
_PORTS = ("GRPC_PORT", "LOCAL_SERVICE_PORT")
_PATHS = ("CA_CERT_PATH", "CLIENT_CERT_PATH", "CLIENT_KEY_PATH")
# A host name or IPv4 address, or an IPv6 address in brackets; optionally :port.
_HOST = re.compile(
    r"^(?P<host>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d+))?$"
)


@dataclass(frozen=True)
class EnvSettings:
    """The deployment variables, typed. Every field is optional: None means "not set"."""

    service_name: str | None = None
    service_version: str | None = None
    grpc_port: int | None = None
    local_service_port: int | None = None
    ca_cert_path: Path | None = None
    client_cert_path: Path | None = None
    client_key_path: Path | None = None
    jaeger_host: str | None = None
    metrics_host: str | None = None
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str | None = None
    otel_traces_sampler: str | None = None
    otel_traces_sampler_arg: float | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> EnvSettings:
        """Read the variables from `environ` (default: os.environ). Unset variables are None; a set
        but empty or malformed variable is an error. Every problem is reported, not only the first."""
        env = os.environ if environ is None else environ
        issues: list[ConfigIssue] = []
        values: dict[str, object] = {}
        for var, field in ENV_VARS.items():
            raw = env.get(var)
            if raw is None:
                continue
            value = raw.strip()
            if not value:
                issues.append(ConfigIssue(var, f"expected a non-empty value, got {raw!r} (unset it instead)"))
                continue
            try:
                values[field] = _convert(var, value)
            except ValueError as exc:
                issues.append(ConfigIssue(var, str(exc)))
        if issues:
            raise ConfigError(ENV_FILE, issues)
        return cls(**values)  # type: ignore[arg-type]  # values are typed per field by _convert

    @property
    def otlp_endpoint(self) -> str | None:
        """JAEGER_HOST as an OTLP/gRPC endpoint: `jaeger` -> `http://jaeger:4317` (a given port is kept)."""
        if self.jaeger_host is None:
            return None
        m = _HOST.match(self.jaeger_host)
        if m is None:  # from_environ checked it; a hand-made EnvSettings may not have been
            raise ConfigError.single(ENV_FILE, "JAEGER_HOST", _host_expected("JAEGER_HOST", self.jaeger_host))
        return f"http://{m.group('host')}:{m.group('port') or OTLP_GRPC_PORT}"

    @property
    def tracing_endpoint(self) -> str | None:
        """Where spans go per the environment: OTEL_EXPORTER_OTLP_ENDPOINT, or JAEGER_HOST's endpoint.
        Both set to different endpoints is an error: which one the deployment means is not ours to guess."""
        otel, jaeger = self.otel_exporter_otlp_endpoint, self.otlp_endpoint
        if otel is not None and jaeger is not None and otel != jaeger:
            raise ConfigError.single(ENV_FILE, "OTEL_EXPORTER_OTLP_ENDPOINT",
                                     f"JAEGER_HOST is set too and means {jaeger}, not {otel}: unset one of them")
        return otel if otel is not None else jaeger

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in ENV_VARS.values())


def _host_expected(var: str, value: str) -> str:
    example = "jaeger or jaeger:4317" if var == "JAEGER_HOST" else "prometheus or 10.0.0.5"
    return f"expected a host name or host:port such as {example}, got {value!r}"


def _convert(var: str, value: str) -> object:
    if var in _PORTS:
        if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
            raise ValueError(f"expected an integer port 1-65535, got {value!r}")
        return int(value)
    if var in _PATHS:
        return Path(value).expanduser()
    if var == "SERVICE_NAME":
        if not SERVICE_NAME.match(value):
            raise ValueError(f"expected a service name (a DNS label such as auth-svc), got {value!r}")
        return value
    if var == "SERVICE_VERSION":
        if any(c.isspace() for c in value):
            raise ValueError(f"expected a version without spaces such as 1.2.0, got {value!r}")
        return value
    if var == "JAEGER_HOST":
        # Deployments sometimes write a URL; accept http(s)://host[:port] as well.
        bare = re.sub(r"^https?://", "", value).rstrip("/")
        m = _HOST.match(bare)
        if m is None or (m.group("port") is not None and not 1 <= int(m.group("port")) <= 65535):
            raise ValueError(_host_expected(var, value))
        return bare
    if var == "OTEL_EXPORTER_OTLP_ENDPOINT":
        # OTLP/gRPC: the URL's scheme says plaintext or TLS, its path is not used (a port is kept).
        m = re.match(r"^(?P<scheme>https?)://(?P<rest>[^/?#]+)(?:[/?#].*)?$", value, re.IGNORECASE)
        host = _HOST.match(m.group("rest")) if m else None
        if m is None or host is None or (host.group("port") is not None and not 1 <= int(host.group("port")) <= 65535):
            raise ValueError(f"expected an OTLP/gRPC endpoint URL such as http://otel-collector:4317, got {value!r}")
        return f"{m.group('scheme').lower()}://{host.group('host')}:{host.group('port') or OTLP_GRPC_PORT}"
    if var == "OTEL_SERVICE_NAME":
        return value
    if var == "OTEL_TRACES_SAMPLER":
        if value.lower() not in TRACES_SAMPLERS:
            raise ValueError(f"expected one of {', '.join(TRACES_SAMPLERS)}, got {value!r}")
        return value.lower()
    if var == "OTEL_TRACES_SAMPLER_ARG":
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:  # also NaN
            raise ValueError(f"expected a sampling ratio from 0 to 1 such as 0.25, got {value!r}")
        return ratio
    if var == "METRICS_HOST":
        m = _HOST.match(value)
        if m is None or m.group("port") is not None:
            raise ValueError(_host_expected(var, value).replace(" or host:port", ""))
        return value
    raise AssertionError(var)  # pragma: no cover - ENV_VARS and _convert list the same names


def apply_env(mesh: MeshSpec, env: EnvSettings) -> MeshSpec:
    """A copy of `mesh` with the environment applied:

    * SERVICE_NAME selects the service that SERVICE_VERSION, GRPC_PORT (`port`) and
      LOCAL_SERVICE_PORT (`local_port`) override; it must name a service of mesh.yaml.
    * JAEGER_HOST (`http://host:4317`) or OTEL_EXPORTER_OTLP_ENDPOINT sets
      `observability.tracing.otlp_endpoint` and enables tracing (both, to different endpoints: an error).
    * OTEL_TRACES_SAMPLER sets `observability.tracing.sampler`, OTEL_TRACES_SAMPLER_ARG its `sample_ratio`.
    * METRICS_HOST sets `observability.metrics.host`.

    The certificate paths are not part of mesh.yaml; the PKI layer reads them from `env`. Nor is
    OTEL_SERVICE_NAME, one process's name in its spans: `ProcessTelemetry.for_service(...,
    otel_service_name=env.otel_service_name)` takes it.
    The result is validated again (e.g. a GRPC_PORT already used by another service is an error).
    """
    mesh_update: dict[str, object] = {}
    scope: str | None = None
    service_vars = {
        "SERVICE_VERSION": ("version", env.service_version),
        "GRPC_PORT": ("port", env.grpc_port),
        "LOCAL_SERVICE_PORT": ("local_port", env.local_service_port),
    }
    if env.service_name is None:
        given = [var for var, (_, value) in service_vars.items() if value is not None]
        if given:
            raise ConfigError.single(
                ENV_FILE, "SERVICE_NAME",
                f"required when {', '.join(given)} is set: which service do they configure?",
            )
    else:
        if env.service_name not in mesh.service_names:
            raise ConfigError.single(
                ENV_FILE, "SERVICE_NAME",
                f"unknown service {env.service_name!r}: mesh.yaml defines {', '.join(mesh.service_names)}",
            )
        index = mesh.service_names.index(env.service_name)
        svc = mesh.services[index]
        svc_update = {key: value for key, value in service_vars.values() if value is not None}
        _check_ports(mesh, index, env)
        scope = env.service_name
        services = list(mesh.services)
        services[index] = svc.model_copy(update=svc_update)
        mesh_update["services"] = tuple(services)

    obs = mesh.observability
    obs_update: dict[str, object] = {}
    tracing_update: dict[str, object] = {}
    if (endpoint := env.tracing_endpoint) is not None:
        tracing_update.update(otlp_endpoint=endpoint, enabled=True)
    if env.otel_traces_sampler is not None:
        tracing_update["sampler"] = env.otel_traces_sampler
    if env.otel_traces_sampler_arg is not None:
        tracing_update["sample_ratio"] = env.otel_traces_sampler_arg
    if tracing_update:
        obs_update["tracing"] = obs.tracing.model_copy(update=tracing_update)
    if env.metrics_host is not None:
        obs_update["metrics"] = obs.metrics.model_copy(update={"host": env.metrics_host})
    if obs_update:
        mesh_update["observability"] = obs.model_copy(update=obs_update)

    if not mesh_update:
        return mesh
    updated = mesh.model_copy(update=mesh_update)
    # model_copy does not validate: check the result as a whole, keeping which keys were written
    # (exclude_unset) so that partial overrides still layer over the defaults.
    try:
        return MeshSpec.model_validate(updated.model_dump(by_alias=True, exclude_unset=True),
                                       context={POD_SCOPE: scope} if scope else None)
    except ValidationError as exc:
        issues = []
        for err in exc.errors(include_url=False):
            for loc, msg in _describe(dict(err)):
                issues.append(ConfigIssue(_env_var_for(loc, env), f"{msg} (in {yaml_path(loc)} after applying it)"))
        raise ConfigError(ENV_FILE, issues) from None


def _env_var_for(loc: tuple[str | int, ...], env: EnvSettings) -> str:
    last = loc[-1] if loc else ""
    endpoint = "OTEL_EXPORTER_OTLP_ENDPOINT" if env.otel_exporter_otlp_endpoint is not None else "JAEGER_HOST"
    return {"port": "GRPC_PORT", "local_port": "LOCAL_SERVICE_PORT", "version": "SERVICE_VERSION",
            "otlp_endpoint": endpoint, "host": "METRICS_HOST", "sampler": "OTEL_TRACES_SAMPLER",
            "sample_ratio": "OTEL_TRACES_SAMPLER_ARG"}.get(str(last), "SERVICE_NAME")


def _check_ports(mesh: MeshSpec, index: int, env: EnvSettings) -> None:
    """GRPC_PORT / LOCAL_SERVICE_PORT must not take a port another key of this service already uses.
    Other services' ports do not matter: a deployed service has its own network namespace."""
    svc = mesh.services[index]
    new = {"port": env.grpc_port, "local_port": env.local_service_port}
    used: dict[int, str] = {}
    for i, s in enumerate(mesh.services):
        if i != index:
            continue
        for field, port in (("port", s.port), ("local_port", s.local_port), ("admin_port", s.admin_port),
                            ("sidecar.inbound_port", s.sidecar.inbound_port),
                            ("sidecar.outbound_port", s.sidecar.outbound_port),
                            ("sidecar.admin_port", s.sidecar.admin_port)):
            if i == index and field in new and new[field] is not None:
                continue  # replaced by the environment
            if port is not None:
                used[port] = f"{s.name} (services[{i}].{field})"
    issues = []
    for var, field in (("GRPC_PORT", "port"), ("LOCAL_SERVICE_PORT", "local_port")):
        port = new[field]
        if port is None:
            continue
        if port in used:
            issues.append(ConfigIssue(var, f"port {port} is already used by {used[port]}"))
        used[port] = f"{svc.name} ({var})"
    if issues:
        raise ConfigError(ENV_FILE, issues)
