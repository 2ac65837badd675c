"""The mesh model: what mesh.yaml says, typed and checked.

The model is frozen and knows nothing about grpc, files or processes. Policy layers, renderers
and the runtime each read the slice they need through the helpers at the bottom
(`effective_route`, `ports_for`), so defaults are resolved in exactly one place.

Durations are written as `5s`, `100ms`, `1m` or a bare number of seconds and held as float seconds.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    Strict,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from aivo_mesh.config.memo import per_mesh
from aivo_mesh.config.ports import port_problems
from aivo_mesh.errors import ConfigError, nearest_line, yaml_path
from aivo_mesh.status import DEFAULT_FAILURE_CODES
from aivo_mesh.status import GRPC_STATUS_NAMES as GRPC_STATUS_NAMES  # the status codes a policy may name
from aivo_mesh.status import StatusName as StatusName

_DURATION = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.ASCII)  # ASCII: as mesh.schema.json
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_DURATION = 365 * 24 * 3600.0


def parse_duration(value: Any) -> float:
    """`"100ms"` -> 0.1; `"5s"`/`5`/`5.0` -> 5.0; `"1m"` -> 60.0."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s, 100ms or 1m")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * _UNIT[m.group(2)]
        else:
            raise ValueError("expected a duration such as 5s, 100ms or 1m")
    except OverflowError:  # an integer too large for a float: pydantic would not catch it
        raise ValueError("expected a finite duration such as 5s, 100ms or 1m") from None
    if not math.isfinite(seconds):
        raise ValueError("expected a finite duration such as 5s, 100ms or 1m")
    if seconds < 0:
        raise ValueError(f"expected a non-negative duration, got {value!r}")
    if seconds > MAX_DURATION:  # beyond any deadline grpc or Envoy can represent usefully
        raise ValueError(f"expected a duration of at most {MAX_DURATION / 3600:.0f}h, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Inverse of parse_duration: the first of `5s`, `100ms`, `0.5ms` that parses back to exactly
    `seconds`, else the exact number of seconds (`0.7s`: `700ms` would read back as 0.7000000000000001).
    How every model and `config show` write a duration."""
    if not math.isfinite(seconds * 1000):
        return f"{seconds}s"
    ms = round(seconds * 1000)
    fine = f"{seconds * 1000:.6f}".rstrip("0").rstrip(".") + "ms"  # finer than a millisecond
    for text in (f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms", fine):
        if parse_duration(text) == seconds:
            return text
    # repr is the shortest exact spelling; Decimal writes it without an exponent, which mesh.yaml refuses.
    return f"{Decimal(repr(seconds)):f}s"


def to_data(model: BaseModel, *, exclude_none: bool = False) -> dict[str, Any]:
    """A model as plain data, as mesh.yaml writes it: keys as in the file (`from`), durations as `5s` or
    `100ms`, tuples as lists. The one serializer of the model: `config show` and local runs use it."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=exclude_none)


# YAML already types scalars, so `port: true`, `port: "50051"` or `idempotent: "yes"` are mistakes to
# report, not values to coerce (lax pydantic reads them as 1, 50051 and True). Strict per field, not
# model-wide: strict models would refuse the YAML lists that tuple fields are fed.
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
StrictNumber = Annotated[float, Strict()]  # an int is still a number; a bool or a string is not



def _duration_schema(positive: bool) -> WithJsonSchema:
    """What mesh.schema.json tells editors a duration is: the spellings parse_duration reads."""
    number: dict[str, Any] = {"type": "number", "maximum": MAX_DURATION}
    number["exclusiveMinimum" if positive else "minimum"] = 0
    return WithJsonSchema({
        "anyOf": [number, {"type": "string", "pattern": _DURATION.pattern}],
        "description": f"a {'positive ' if positive else ''}duration: 5s, 100ms, 1m, 1h or a number of seconds",
    })


# Written as mesh.yaml spells them wherever a model becomes data (`model_dump(mode="json")`: `config show`,
# the effective mesh a local run hands its processes, the cluster's ConfigMap); Python mode keeps floats.
_DURATION_TEXT = PlainSerializer(format_duration, return_type=str, when_used="json")
Duration = Annotated[float, BeforeValidator(parse_duration), _duration_schema(False), _DURATION_TEXT]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0), _duration_schema(True),
                             _DURATION_TEXT]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Percent = Annotated[StrictNumber, Field(ge=0, le=100)]

# Validation context key: the name of the one service this process is (ports of others not checked).
POD_SCOPE = "pod_scope"

SERVICE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,61}[a-z0-9]$")
# A service's version is a Kubernetes label value (`version` on its pods and canary selectors), the
# SERVICE_VERSION of its container and a Consul Meta value: the label rule is the strictest of the three.
SERVICE_VERSION = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
# `metadata` becomes Consul service Meta, with `version` added (render/consul.py, consul_register):
# Consul refuses the registration otherwise (agent/structs: validateMetaPair).
TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
GRPC_SERVICE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$", re.ASCII)
CONSUL_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
CONSUL_META_VALUE_MAX = 512
CONSUL_META_PAIRS_MAX = 64
# A gRPC method pattern: "/pkg.Service/Method", "/pkg.Service/" (prefix) or "pkg.Service" (whole service).
METHOD_PATTERN = re.compile(r"^/?[A-Za-z_][\w.]*(/(\w+)?)?$", re.ASCII)  # protobuf names are ASCII


def _method_pattern(value: str) -> str:
    """One spelling per pattern, the one the Authorizer, route matching and Envoy compare against:
    `pkg.Svc`, `/pkg.Svc` and `/pkg.Svc/` are the prefix `/pkg.Svc/`; `pkg.Svc/M` is `/pkg.Svc/M`."""
    if not METHOD_PATTERN.fullmatch(value):
        raise ValueError(f"expected a gRPC method such as /aivo.auth.v1.AuthService/Authenticate or a "
                         f"service prefix such as /aivo.auth.v1.AuthService/, got {value!r}")
    path = value if value.startswith("/") else "/" + value
    return path if "/" in path[1:] else path + "/"


MethodPattern = Annotated[str, AfterValidator(_method_pattern), WithJsonSchema(
    {"type": "string", "pattern": METHOD_PATTERN.pattern,
     "description": "a gRPC method such as /pkg.Service/Method, or a service prefix such as /pkg.Service/"})]


@functools.cache
def _load_shipped_protos() -> None:
    """Import every *_pb2 module aivo-mesh ships (once), so the descriptor pool knows their services."""
    import importlib
    import pkgutil

    import aivo_mesh.gen

    for mod in pkgutil.walk_packages(aivo_mesh.gen.__path__, "aivo_mesh.gen."):
        if mod.name.endswith("_pb2"):  # not *_pb2_grpc: the config layer never loads grpc
            importlib.import_module(mod.name)


def known_methods(grpc_service: str) -> tuple[str, ...]:
    """Method names of `grpc_service` in the protos aivo-mesh ships (or any loaded before); () for a
    service defined elsewhere. mesh.yaml may name services we have no proto of: only error messages and
    renderings that list methods use this."""
    from google.protobuf import descriptor_pool

    _load_shipped_protos()
    try:
        desc = descriptor_pool.Default().FindServiceByName(grpc_service)
    except KeyError:
        return ()
    return tuple(m.name for m in desc.methods)


def _not_a_method_of(grpc_service: str, pattern: str) -> str | None:
    """Why `pattern` (normalised) covers no method of `grpc_service`, or None when it is one of its
    methods or its prefix. Checked for routes and allow rules alike: an allow rule naming another
    service's method, or a misspelt one, denies every call it was meant to allow."""
    prefix = f"/{grpc_service}/"
    methods = known_methods(grpc_service)
    listed = f" (its methods: {', '.join(methods)})" if methods else ""
    if pattern.startswith(prefix):
        name = pattern[len(prefix):]
        # A misspelt method of a service whose proto we ship would never match a call: its route
        # policy or allow rule would silently not apply. Services without a shipped proto pass.
        if name and methods and name not in methods:
            return f"{name!r} is not a method of {grpc_service}{listed}: a route or rule for it never applies"
        return None
    bare = pattern.strip("/")
    shown = bare if "/" not in bare and "." not in bare else pattern  # `ListEvents`, as it was written
    return (f"{shown!r} is not a method of {grpc_service}{listed}: expected {prefix}<Method>, "
            f"or {prefix} for every method")


def _is_host_port(value: str) -> bool:
    """`host:port` or `[v6]:port`, the port 1-65535 (service endpoints, the StatsD address)."""
    host, sep, port = value.strip().rpartition(":")
    return bool(sep and host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535)


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in mesh.yaml must never be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class BackoffSpec(_Strict):
    base: PositiveDuration = 0.1
    max: PositiveDuration = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> BackoffSpec:
        # Only when both are written here: a lone `base` or `max` overrides one key of the level
        # above, so the pair is checked on the effective values in MeshSpec._references.
        if {"base", "max"} <= self.model_fields_set and self.max < self.base:
            raise ValueError(f"max ({self.max}s) must be >= base ({self.base}s)")
        return self


class RetrySpec(_Strict):
    """Retries of one call. `retry_on` names gRPC status codes; INTERNAL only for idempotent routes."""

    max_retries: Annotated[StrictInt, Field(ge=0, le=10)] = 3
    backoff: BackoffSpec = BackoffSpec()
    retry_on: tuple[StatusName, ...] = ("UNAVAILABLE",)
    per_try_timeout: PositiveDuration | None = None


class RetryBudgetSpec(_Strict):
    """Envoy's retry budget: retries may be at most `percent` of active requests, but
    `min_retry_concurrency` concurrent retries are always allowed. `window` is the span over
    which recent requests are counted by the proxyless plane."""

    percent: Percent = 25.0
    min_retry_concurrency: Annotated[StrictInt, Field(ge=0)] = 3
    window: PositiveDuration = 10.0


class CircuitBreakerSpec(_Strict):
    """CLOSED -> OPEN after `consecutive_failures` failed calls (or a failure rate over a window) ->
    HALF_OPEN after a wait -> CLOSED after `half_open_max_calls` successful probes. The wait starts
    near `first_probe` and doubles with each failed probe, with jitter, up to `recovery_time`."""

    mode: Literal["consecutive", "failure_rate"] = "consecutive"
    consecutive_failures: Annotated[StrictInt, Field(ge=1)] = 5
    first_probe: PositiveDuration = 1.0
    recovery_time: PositiveDuration = 60.0
    half_open_max_calls: Annotated[StrictInt, Field(ge=1)] = 1
    failure_rate_threshold: Percent = 50.0
    window_size: Annotated[StrictInt, Field(ge=1)] = 100
    minimum_calls: Annotated[StrictInt, Field(ge=1)] = 20
    failure_codes: tuple[StatusName, ...] = DEFAULT_FAILURE_CODES

    @model_validator(mode="after")
    def _probe_within_recovery(self) -> CircuitBreakerSpec:
        # Only when both are written here: a lone `recovery_time` shorter than the inherited first
        # probe is a valid wish (probe after recovery_time every time), so the breaker caps
        # first_probe at recovery_time instead; writing both the wrong way round is a contradiction.
        if {"first_probe", "recovery_time"} <= self.model_fields_set and self.first_probe > self.recovery_time:
            raise ValueError(f"first_probe ({self.first_probe}s) must be <= recovery_time ({self.recovery_time}s)")
        return self


class LimitsSpec(_Strict):
    """Concurrency thresholds per target (Envoy `circuit_breakers.thresholds`)."""

    max_connections: Annotated[StrictInt, Field(ge=1)] = 1000
    # At least 1: Envoy queues every call as pending while its pool opens a connection, so with 0 it never
    # opens one (no call, no health check gets through) while the proxyless plane would work.
    max_pending_requests: Annotated[StrictInt, Field(ge=1)] = 100

    @field_validator("max_pending_requests", mode="before")
    @classmethod
    def _pending(cls, v: object) -> object:
        if v == 0 and not isinstance(v, bool):
            raise ValueError("expected an integer >= 1: Envoy holds every call as a pending request while it "
                             "opens the connection, so with 0 a sidecar never connects and the peer never "
                             "becomes healthy (use 1 for the smallest queue)")
        return v
    max_requests: Annotated[StrictInt, Field(ge=1)] = 1000
    max_retries: Annotated[StrictInt, Field(ge=0)] = 10


class OutlierDetectionSpec(_Strict):
    """Per-endpoint ejection (policy/outlier.py; Envoy's outlier_detection on the sidecars).

    Short first (1 s, like circuit_breaker.first_probe) and growing by `base_ejection_time` per
    ejection in a row up to `max_ejection_time`, so a stall costs about a second and a dead endpoint
    stays out for up to a minute. `interval` is also Envoy's sweep period, the only time it returns
    a host, so it must not be longer than `base_ejection_time`.
    """

    consecutive_failures: Annotated[StrictInt, Field(ge=1)] = 5
    interval: PositiveDuration = 1.0
    base_ejection_time: PositiveDuration = 1.0
    max_ejection_time: PositiveDuration = 60.0
    max_ejection_percent: Percent = 50.0


class HealthCheckSpec(_Strict):
    interval: PositiveDuration = 30.0
    timeout: PositiveDuration = 5.0
    unhealthy_threshold: Annotated[StrictInt, Field(ge=1)] = 3
    healthy_threshold: Annotated[StrictInt, Field(ge=1)] = 1


INT32_MAX = 2_147_483_647  # grpc channel arguments are C ints


class KeepaliveSpec(_Strict):
    """HTTP/2 keepalive of the platform's design (grpc channel args of the same names)."""

    time_ms: Annotated[StrictInt, Field(ge=1000, le=INT32_MAX)] = 30000
    timeout_ms: Annotated[StrictInt, Field(ge=100, le=INT32_MAX)] = 5000
    permit_without_calls: StrictBool = True
    max_pings_without_data: Annotated[StrictInt, Field(ge=0, le=INT32_MAX)] = 0


class Http2Spec(_Strict):
    max_concurrent_streams: Annotated[StrictInt, Field(ge=1, le=2147483647)] = 1000
    initial_stream_window_size: Annotated[StrictInt, Field(ge=65535, le=2147483647)] = 1048576
    initial_connection_window_size: Annotated[StrictInt, Field(ge=65535, le=2147483647)] = 4194304
    per_connection_buffer_limit_bytes: Annotated[StrictInt, Field(ge=1024)] = 1048576


class FaultSpec(_Strict):
    """Fault injection on the inbound side, after authorization (MeshServer; Envoy's fault filter); off
    unless percentages are set. Delay and abort are independent draws: the delay first, then the abort.
    `callers` (service names, mesh clients, spiffe:// IDs, as allow rules' `from`) limits it to those
    callers; empty or `*`: every caller. A route's `fault` overrides the service's key by key."""

    abort_status: StatusName | None = None
    abort_percent: Percent = 0.0
    delay: Duration | None = None
    delay_percent: Percent = 0.0
    callers: tuple[str, ...] = ()


# Envoy's token bucket counts tokens in a uint32 and Linkerd's requestsPerSecond is an integer: whole
# requests per second, up to a bound both take.
MAX_RATE = 1_000_000
Rate = Annotated[StrictInt, Field(ge=1, le=MAX_RATE)]


class CallerRateLimitSpec(_Strict):
    """One calling identity's own bucket (`rate_limit.callers`)."""

    requests_per_second: Rate
    burst: Rate | None = None


class RateLimitSpec(_Strict):
    """Inbound rate limit of a service or route: a token bucket refilled with `requests_per_second` tokens
    per second up to `burst` (default: `requests_per_second`); each admitted call takes one. `per_caller`:
    each calling identity the allow rules admit gets a bucket of its own, else they share one; `callers`:
    identities with a bucket of their own size whatever `per_caller` says (service names, mesh clients or
    spiffe:// IDs). Health checks and reflection are never limited."""

    requests_per_second: Rate | None = None
    burst: Rate | None = None
    per_caller: StrictBool = False
    callers: dict[str, CallerRateLimitSpec] = Field(default_factory=dict)


class PolicySpec(_Strict):
    """The policy knobs that may be set mesh-wide (`defaults`) and overridden per service."""

    timeout: PositiveDuration | None = None
    retry: RetrySpec | None = None
    retry_budget: RetryBudgetSpec | None = None
    circuit_breaker: CircuitBreakerSpec | None = None
    limits: LimitsSpec | None = None
    outlier_detection: OutlierDetectionSpec | None = None
    health_check: HealthCheckSpec | None = None


class RouteSpec(_Strict):
    """A gRPC method (`/pkg.Svc/Method`) or a service prefix (`/pkg.Svc/`) with its own policy."""

    match: MethodPattern
    timeout: PositiveDuration | None = None
    retry: RetrySpec | None = None
    idempotent: StrictBool = False
    streaming: StrictBool = False
    rate_limit: RateLimitSpec | None = None
    fault: FaultSpec | None = None


class AllowRule(_Strict):
    """Callers (`from`: service names, `mesh-client`, or full spiffe:// IDs) and the methods they may call
    (`methods`: patterns as in routes; empty means every method of the service)."""

    from_: Annotated[tuple[str, ...], Field(alias="from", min_length=1)]
    methods: tuple[MethodPattern, ...] = ()


class SidecarSpec(_Strict):
    """This service's Envoy: where it listens on one machine (Kubernetes/Compose renderings use the
    conventional per-pod ports instead: 50051 / 15001 / 9901), and whether its outbound listener takes
    the app's calls over mTLS (docs/envoy.md, "The outbound listener")."""

    inbound_port: Port | None = None
    outbound_port: Port | None = None
    admin_port: Port | None = None
    outbound_tls: StrictBool = Field(default=False, description=(
        "The outbound listener requires TLS 1.3 and the app's own mesh certificate (this service's "
        "SPIFFE ID); false: plaintext h2 on the pod's loopback or the local mesh's 0600 Unix socket"))


class EndpointSpec(_Strict):
    """One instance of a service written with its version: `{address: 10.0.0.7:50052, version: v2}`
    (a plain `host:port` string is an instance of the service's own `version`). The version is what a
    `canary` weight sends traffic to, as Istio's subsets select pods by their `version` label."""

    address: str
    version: str | None = Field(default=None, json_schema_extra={"pattern": SERVICE_VERSION.pattern})

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not _is_host_port(v):
            raise ValueError(f"endpoint {v!r}: expected host:port, e.g. 127.0.0.1:50051")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None and not SERVICE_VERSION.fullmatch(v):
            raise ValueError(f"expected a version such as 1.2.0 or v2 (a Kubernetes label value), got {v[:60]!r}")
        return v


class ServiceSpec(_Strict):
    # json_schema_extra: the checks of the validators below, told to editors (mesh.schema.json).
    name: str = Field(json_schema_extra={"pattern": SERVICE_NAME.pattern})
    version: str = Field(default="1.0.0", json_schema_extra={"pattern": SERVICE_VERSION.pattern})
    grpc_service: str = Field(description="Fully-qualified gRPC service, e.g. aivo.auth.v1.AuthService",
                              json_schema_extra={"pattern": GRPC_SERVICE.pattern})
    port: Port = Field(description="Mesh gRPC port (mTLS) where callers reach the service")
    local_port: Port = Field(description="Port of the application behind its sidecar")
    admin_port: Port | None = None
    host: str = "127.0.0.1"
    endpoints: tuple[str | EndpointSpec, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: dict[str, str] = Field(default_factory=dict, json_schema_extra={
        "propertyNames": {"pattern": "^(?!consul-)[A-Za-z0-9_-]{1,128}$"},
        "additionalProperties": {"type": "string", "maxLength": CONSUL_META_VALUE_MAX}})
    timeout: PositiveDuration | None = None
    retry: RetrySpec | None = None
    retry_budget: RetryBudgetSpec | None = None
    circuit_breaker: CircuitBreakerSpec | None = None
    limits: LimitsSpec | None = None
    outlier_detection: OutlierDetectionSpec | None = None
    health_check: HealthCheckSpec | None = None
    fault: FaultSpec | None = None
    rate_limit: RateLimitSpec | None = None
    routes: tuple[RouteSpec, ...] = ()
    allow: tuple[AllowRule, ...] = ()
    sidecar: SidecarSpec = SidecarSpec()
    canary: dict[str, Annotated[StrictInt, Field(ge=0, le=100)]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SERVICE_NAME.fullmatch(v):  # fullmatch: `$` would let a trailing newline through
            raise ValueError("expected a DNS label: lower-case letters, digits and '-', e.g. auth-svc")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not SERVICE_VERSION.fullmatch(v):
            raise ValueError(f"expected a version such as 1.2.0 or v2 (at most 63 letters, digits, '.', '_' "
                             f"and '-', starting and ending with a letter or digit: a Kubernetes label "
                             f"value), got {v if len(v) <= 60 else v[:57] + '...'!r}")
        return v

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: tuple[str | EndpointSpec, ...]) -> tuple[str | EndpointSpec, ...]:
        for e in v:
            if isinstance(e, str) and not _is_host_port(e):
                raise ValueError(f"endpoint {e!r}: expected host:port, e.g. 127.0.0.1:50051")
        return v

    @property
    def endpoint_addresses(self) -> tuple[str, ...]:
        """`endpoints` as `host:port` strings, in the order written."""
        return tuple(e if isinstance(e, str) else e.address for e in self.endpoints)

    @property
    def endpoint_versions(self) -> tuple[tuple[str, str], ...]:
        """`endpoints` as (address, version) pairs, a plain string being of the service's own `version`."""
        return tuple((e, self.version) if isinstance(e, str) else (e.address, e.version or self.version)
                     for e in self.endpoints)

    @field_validator("grpc_service")
    @classmethod
    def _grpc_service(cls, v: str) -> str:
        if not GRPC_SERVICE.fullmatch(v):
            raise ValueError("expected a fully-qualified gRPC service such as aivo.auth.v1.AuthService")
        return v


# OpenTelemetry's standard samplers (OTEL_TRACES_SAMPLER values). `parentbased_*` follow the caller's
# decision when the call carries a traceparent; the ratio ones sample `sample_ratio` of new traces.
TRACES_SAMPLERS: tuple[str, ...] = ("parentbased_traceidratio", "parentbased_always_on", "parentbased_always_off",
                                    "traceidratio", "always_on", "always_off")


class TracingSpec(_Strict):
    enabled: StrictBool = False
    otlp_endpoint: str = "http://127.0.0.1:4317"
    sample_ratio: Annotated[StrictNumber, Field(ge=0.0, le=1.0)] = 1.0
    sampler: Literal["parentbased_traceidratio", "parentbased_always_on", "parentbased_always_off",
                     "traceidratio", "always_on", "always_off"] = "parentbased_traceidratio"


class MetricsSpec(_Strict):
    enabled: StrictBool = True
    host: str = "127.0.0.1"
    # Per-method gRPC stats (Envoy's grpc_stats filter) on each sidecar's inbound listener. Off by default:
    # the app behind the sidecar counts every call it serves per method and status (MeshServer's
    # grpc_requests_total, what meshctl status and the dashboards read), and the filter costs the inbound
    # hop 21 k instructions per request, 8 % (docs/benchmarks.md).
    envoy_inbound_grpc_stats: StrictBool = False
    # The same on each sidecar's outbound listener. Off by default: the outbound cluster stats carry the
    # caller's view (gRPC status, retries, timeouts, ejections), and the filter costs about 20 us of Envoy
    # CPU per request on the 2-core development VM (docs/benchmarks.md).
    envoy_outbound_grpc_stats: StrictBool = False


class StatsdSpec(_Strict):
    enabled: StrictBool = False
    address: str = "127.0.0.1:8125"
    prefix: str = "aivo_mesh"

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        # Checked here, not only when a process starts sending: `config validate` is where to hear it.
        if not _is_host_port(v):
            raise ValueError(f"expected host:port such as 127.0.0.1:8125, got {v!r}")
        return v


class ControlPlaneSpec(_Strict):
    """Where Envoys (and, with it, proxyless processes) take their configuration live over xDS (ADS).

    `identity` is the control plane's own certificate identity (SPIFFE ID `.../sa/<identity>`), issued
    with the others by `meshctl certs issue --all`; nodes accept no other server. `address` is where it
    listens (mTLS only); `meshctl up` picks a free port when it runs one."""

    identity: str = "control-plane"
    address: str = "127.0.0.1:15010"
    # Loopback HTTP: node status, config versions, `meshctl apply`. Unauthenticated, like every admin
    # endpoint of the mesh: keep it on loopback.
    admin_address: str = "127.0.0.1:15011"

    @field_validator("identity")
    @classmethod
    def _identity(cls, v: str) -> str:
        if not SERVICE_NAME.match(v):
            raise ValueError("expected a DNS label: lower-case letters, digits and '-', e.g. control-plane")
        return v

    @field_validator("address", "admin_address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not _is_host_port(v):
            raise ValueError(f"expected host:port such as 127.0.0.1:15010, got {v!r}")
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def admin_host_port(self) -> tuple[str, int]:
        host, _, port = self.admin_address.rpartition(":")
        return host.strip("[]"), int(port)


class ObservabilitySpec(_Strict):
    tracing: TracingSpec = TracingSpec()
    metrics: MetricsSpec = MetricsSpec()
    statsd: StatsdSpec = StatsdSpec()
    jaeger_ui: str | None = None


class MeshInfo(_Strict):
    name: str = "aivo"
    trust_domain: str = Field(default="aivo.local", json_schema_extra={"pattern": TRUST_DOMAIN.pattern})
    namespace: str = "default"
    # Identities that are not services: health checkers, test tools and operators use mesh-client.
    clients: tuple[str, ...] = ("mesh-client",)

    @field_validator("trust_domain")
    @classmethod
    def _td(cls, v: str) -> str:
        if not TRUST_DOMAIN.fullmatch(v):
            raise ValueError("expected a trust domain such as aivo.local (lower-case, no scheme or path)")
        return v


_HEX_SERIAL = re.compile(r"^(0x)?[0-9a-f]+$")


def normalize_serial(value: object) -> str:
    """A certificate serial as `meshctl certs inspect` prints it: lower-case hex, no `0x`, no colons
    (`3A:F4:..` and `0x3af4..` are accepted and normalised; a bare YAML integer is refused: it would be
    read as decimal)."""
    if not isinstance(value, str):
        raise ValueError("expected the serial as a hex string in quotes, e.g. \"3af4c1...\" "
                         "(as `meshctl certs inspect` prints it)")
    v = value.strip().lower().replace(":", "")
    if not _HEX_SERIAL.match(v) or len(v) > 42:  # RFC 5280: at most 20 octets
        raise ValueError(f"expected a hex certificate serial of at most 20 bytes, got {value!r}")
    v = v.removeprefix("0x").lstrip("0") or "0"
    return v


def _spki(value: object) -> str:
    """An SPKI pin: base64 of the SHA-256 of the DER SubjectPublicKeyInfo (44 characters), as
    `meshctl certs verify` and Envoy's `verify_certificate_spki` write it."""
    import base64
    import binascii

    if not isinstance(value, str):
        raise ValueError("expected a base64 SPKI pin (44 characters), as `meshctl certs verify` prints it")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"expected a base64 SHA-256 SPKI pin (44 characters ending in '='), got {value!r}")
    return value.strip()


HexSerial = Annotated[str, BeforeValidator(normalize_serial)]
SpkiPin = Annotated[str, BeforeValidator(_spki)]


class RevokedCert(_Strict):
    """One certificate no peer may present any more: by serial (what a CRL lists), by SPKI pin (every
    certificate of that key), or both. `note` says why, for the operator who reads the list later."""

    serial: HexSerial | None = None
    spki: SpkiPin | None = None
    identity: str | None = None
    note: str = ""

    @model_validator(mode="after")
    def _something(self) -> RevokedCert:
        if self.serial is None and self.spki is None:
            raise ValueError("expected `serial` or `spki` (or both)")
        return self


class CertificatesSpec(_Strict):
    """What peers may present beyond the fixed policy (docs/certificates.md): revoked certificates, and
    optional SPKI pins per identity (when an identity has pins, only those keys may present it)."""

    revoked: tuple[RevokedCert, ...] = ()
    pins: dict[str, tuple[SpkiPin, ...]] = Field(default_factory=dict)


# Mesh-wide defaults when mesh.yaml says nothing (the platform's design).
BUILTIN_DEFAULTS = PolicySpec(
    timeout=5.0,
    retry=RetrySpec(),
    retry_budget=RetryBudgetSpec(),
    circuit_breaker=CircuitBreakerSpec(),
    limits=LimitsSpec(),
    outlier_detection=OutlierDetectionSpec(),
    health_check=HealthCheckSpec(),
)


class MeshSpec(_Strict):
    """The whole of mesh.yaml."""

    version: Literal[1] = 1
    mesh: MeshInfo = MeshInfo()
    defaults: PolicySpec = PolicySpec()
    keepalive: KeepaliveSpec = KeepaliveSpec()
    http2: Http2Spec = Http2Spec()
    linkerd_model: Literal["serviceprofile", "annotations"] = "serviceprofile"
    services: Annotated[tuple[ServiceSpec, ...], Field(min_length=1)]
    observability: ObservabilitySpec = ObservabilitySpec()
    certificates: CertificatesSpec = CertificatesSpec()
    control_plane: ControlPlaneSpec = ControlPlaneSpec()
    # Where this mesh was read from and the line of each YAML path (set by config.loader, which works the
    # lines out when first asked), so that checks made later (renderers) name the right file and line, as
    # the loader's own errors do.
    _source: str = PrivateAttr(default="mesh.yaml")
    _lines: Callable[[], dict[tuple[str | int, ...], int]] = PrivateAttr(default=dict)

    def error(self, loc: tuple[str | int, ...], message: str) -> ConfigError:
        """A ConfigError about `loc` (e.g. ("services", 0, "local_port")) in this mesh's file, with
        the line of the nearest YAML node."""
        return ConfigError.single(self._source, yaml_path(loc), message, nearest_line(self._lines(), loc))

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: object) -> object:
        if isinstance(v, bool):  # YAML `true` would pass as 1
            raise ValueError(f"expected 1, got {str(v).lower()}")
        return v

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> MeshSpec:
        # Cross-references are checked here so every consumer may assume them. Every problem is
        # collected and reported together (docs/config.md#errors), not only the first.
        # Ports must be distinct across services when they share one machine (local runs); a process
        # deployed in its own network namespace (POD_SCOPE context, see config/env.py) only checks its own.
        scope = (info.context or {}).get(POD_SCOPE)
        problems: list[_PathError] = []
        names = [s.name for s in self.services]
        seen: set[str] = set()
        for i, n in enumerate(names):
            if n in seen:
                problems.append(_PathError(("services", i, "name"), f"duplicate service name {n!r}"))
            seen.add(n)
        known = set(names) | set(self.mesh.clients)
        used_ports: dict[int, str] = {}
        for i, svc in enumerate(self.services):
            callers: list[tuple[tuple[str | int, ...], tuple[str, ...]]] = [
                (("services", i, "allow", r, "from"), rule.from_) for r, rule in enumerate(svc.allow)]
            if svc.fault is not None:
                callers.append((("services", i, "fault", "callers"), svc.fault.callers))
            callers += [(("services", i, "routes", j, "fault", "callers"), route.fault.callers)
                        for j, route in enumerate(svc.routes) if route.fault is not None]
            for loc, listed in callers:
                for c, caller in enumerate(listed):
                    if caller.startswith("spiffe://") or caller == "*":
                        continue
                    if caller not in known:
                        problems.append(_PathError(
                            (*loc, c),
                            f"unknown caller {caller!r}: expected one of {sorted(known)}, "
                            "'*' or a spiffe:// ID",
                        ))
            for r, rule in enumerate(svc.allow):
                for m, pattern in enumerate(rule.methods):
                    if (why := _not_a_method_of(svc.grpc_service, pattern)) is not None:
                        problems.append(_PathError(("services", i, "allow", r, "methods", m), why))
            problems += _rate_limit_problems(i, svc, known)
            first_route: dict[str, int] = {}
            for j, route in enumerate(svc.routes):
                if (why := _not_a_method_of(svc.grpc_service, route.match)) is not None:
                    problems.append(_PathError(("services", i, "routes", j, "match"), why))
                # route_policy takes the first of equal matches: a second one would never apply.
                if (k := first_route.setdefault(route.match, j)) != j:
                    problems.append(_PathError(("services", i, "routes", j, "match"),
                                               f"duplicate route {route.match!r}: services[{i}].routes[{k}] "
                                               "already matches it (merge the two)"))
            for field, port in (("port", svc.port), ("local_port", svc.local_port),
                                ("admin_port", svc.admin_port),
                                ("sidecar.inbound_port", svc.sidecar.inbound_port),
                                ("sidecar.outbound_port", svc.sidecar.outbound_port),
                                ("sidecar.admin_port", svc.sidecar.admin_port)):
                if port is None or (scope is not None and svc.name != scope):
                    continue
                if port in used_ports:
                    path: tuple[str | int, ...] = ("services", i, *field.split("."))
                    problems.append(_PathError(path, f"port {port} is already used by {used_ports[port]}"))
                    continue
                used_ports[port] = f"services[{i}].{field}"
            problems += _consul_meta_problems(i, svc)
            if svc.canary and sum(svc.canary.values()) != 100:
                problems.append(_PathError(("services", i, "canary"), "canary weights must add up to 100"))
            problems += _canary_endpoint_problems(i, svc)
        if self.control_plane.identity in names:
            problems.append(_PathError(("control_plane", "identity"),
                                       f"{self.control_plane.identity!r} is a service's name: the control plane "
                                       "needs an identity of its own"))
        known = known | {self.control_plane.identity}
        for identity in self.certificates.pins:
            if identity not in known:
                problems.append(_PathError(("certificates", "pins", identity),
                                           f"unknown identity {identity!r}: expected one of {sorted(known)}"))
        for r, revoked in enumerate(self.certificates.revoked):
            if revoked.identity is not None and revoked.identity not in known:
                problems.append(_PathError(("certificates", "revoked", r, "identity"),
                                           f"unknown identity {revoked.identity!r}: expected one of {sorted(known)}"))
        problems += [_PathError(loc, why) for loc, why in port_problems(self.services, scope)]
        problems += self._check_backoff()
        if problems:
            raise _PathErrors(problems)
        return self

    def _check_backoff(self) -> list[_PathError]:
        """Back-off `max` >= `base` on the effective values (defaults <- service <- route), reported
        at the innermost `backoff` that set either key."""
        base, max_, where = 0.1, 1.0, ("defaults", "retry", "backoff")
        problems: list[_PathError] = []

        State = tuple[float, float, tuple[str | int, ...]]

        def layer(retry: RetrySpec | None, loc: tuple[str | int, ...], state: State) -> State:
            b, m, w = state
            if retry is None or "backoff" not in retry.model_fields_set:
                return state
            fields = retry.backoff.model_fields_set
            if "base" in fields:
                b = retry.backoff.base
            if "max" in fields:
                m = retry.backoff.max
            if fields & {"base", "max"}:
                w = (*loc, "retry", "backoff")
            if m < b:
                problems.append(_PathError(w, f"max ({m}s) must be >= base ({b}s)"
                                              " (a key left out keeps the value of the level above)"))
            return b, m, w

        mesh_level = layer(self.defaults.retry, ("defaults",), (base, max_, where))
        for i, svc in enumerate(self.services):
            svc_level = layer(svc.retry, ("services", i), mesh_level)
            for j, route in enumerate(svc.routes):
                layer(route.retry, ("services", i, "routes", j), svc_level)
        return problems

    def service(self, name: str) -> ServiceSpec:
        found = _services_by_name(self).get(name)
        if found is None:
            raise KeyError(f"unknown service {name!r}: mesh.yaml defines {[s.name for s in self.services]}")
        return found

    @property
    def service_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.services)

    def spiffe_id(self, name: str) -> str:
        return f"spiffe://{self.mesh.trust_domain}/ns/{self.mesh.namespace}/sa/{name}"


@per_mesh
def _services_by_name(mesh: MeshSpec) -> dict[str, ServiceSpec]:
    """`MeshSpec.service`'s index (the first service of a name, as the model allows only one)."""
    index: dict[str, ServiceSpec] = {}
    for s in mesh.services:
        index.setdefault(s.name, s)
    return index


def _canary_endpoint_problems(i: int, svc: ServiceSpec) -> list[_PathError]:
    """With `endpoints` written, they are every instance there is (static discovery): a canary version given
    traffic but no endpoint would fail each call sent to it. Without them, discovery (DNS, Consul, the
    orchestrator) finds the instances, and `meshctl lint` warns instead (lint/envoy.py)."""
    if not svc.endpoints:
        return []
    have = {version for _, version in svc.endpoint_versions}
    return [_PathError(("services", i, "canary", version),
                       f"no endpoint of version {version!r}, which gets {weight} % of the calls: expected an "
                       f"entry of `endpoints` such as {{address: host:port, version: {version}}} (versions "
                       f"listed: {', '.join(sorted(have))})")
            for version, weight in sorted(svc.canary.items()) if weight > 0 and version not in have]


def _rate_limit_problems(i: int, svc: ServiceSpec, known: set[str]) -> list[_PathError]:
    """A service's and its routes' `rate_limit`: a rate somewhere (a route's block may take the service's),
    callers named as allow rules name them (never `*`: every caller is what `per_caller` is for)."""
    problems = []
    blocks: list[tuple[tuple[str | int, ...], RateLimitSpec | None, RateLimitSpec | None]] = [
        (("services", i, "rate_limit"), svc.rate_limit, None)]
    blocks += [(("services", i, "routes", j, "rate_limit"), r.rate_limit, svc.rate_limit)
               for j, r in enumerate(svc.routes)]
    for loc, block, above in blocks:
        if block is None:
            continue
        if block.requests_per_second is None and (above is None or above.requests_per_second is None):
            where = "a route's block without it takes the service's" if above is None and len(loc) > 3 else ""
            problems.append(_PathError(loc, "expected `requests_per_second` (an integer 1-1000000)"
                                       + (f"; {where}, and the service has none" if where else "")))
        for caller in block.callers:
            if caller.startswith("spiffe://") or caller in known:
                continue
            problems.append(_PathError((*loc, "callers", caller), f"unknown caller {caller!r}: expected one of "
                                       f"{sorted(known)} or a spiffe:// ID"))
    return problems


def _consul_meta_problems(i: int, svc: ServiceSpec) -> list[_PathError]:
    """`metadata` against Consul's Meta rules, each problem at its own key."""
    problems = []
    if len({"version", *svc.metadata}) > CONSUL_META_PAIRS_MAX:
        problems.append(_PathError(("services", i, "metadata"),
                                   f"expected at most {CONSUL_META_PAIRS_MAX - 1} keys (Consul allows "
                                   f"{CONSUL_META_PAIRS_MAX} Meta pairs, one is `version`), got {len(svc.metadata)}"))
    for key, value in svc.metadata.items():
        if not CONSUL_META_KEY.match(key) or key.startswith("consul-"):
            problems.append(_PathError(("services", i, "metadata", key),
                                       f"expected a key of at most 128 ASCII letters, digits, '_' and '-', not "
                                       f"starting with 'consul-' (a Consul Meta key), got {key[:60]!r}"))
        if len(value) > CONSUL_META_VALUE_MAX:
            problems.append(_PathError(("services", i, "metadata", key),
                                       f"expected at most {CONSUL_META_VALUE_MAX} characters (a Consul Meta "
                                       f"value), got {len(value)}"))
    return problems


class _PathError(ValueError):
    """A model-level error that knows where in the document it belongs (see loader)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        self.loc = loc
        super().__init__(message)


class _PathErrors(ValueError):
    """Every cross-reference problem of a document, raised together (the loader reports each)."""

    def __init__(self, errors: list[_PathError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))
