"""Consul self-registration: a service instance announces itself to its local Consul agent.

    reg = ConsulRegistration("127.0.0.1:8500", token=...)
    sid = await reg.register(mesh, "auth-svc", address="10.0.0.5", port=50051)
    ...
    await reg.deregister(sid)

`agent_service_definition` is the pure half (mesh.yaml -> the JSON body of
`PUT /v1/agent/service/register`, exact Consul field names, no I/O); the Consul renderer reuses it
for agent config files. `ConsulRegistration` only sends it.

The definition (C:agent/service, C:agent/check; notes §5):

    {"ID": "auth-svc-10.0.0.5-50051", "Name": "auth-svc", "Tags": ["auth", "tier-1"],
     "Address": "10.0.0.5", "Port": 50051, "Meta": {"version": "1.0.0", "team": "identity"},
     "Check": {"Name": "auth-svc gRPC health", "GRPC": "10.0.0.5:50051/aivo.auth.v1.AuthService",
               "GRPCUseTLS": true, "TLSServerName": "auth-svc", "TLSSkipVerify": false,
               "Interval": "30s", "Timeout": "5s", "DeregisterCriticalServiceAfter": "1m"}}

- ID `<service>-<host>-<port>`: unique per agent and stable across restarts, so re-registering after
  a restart replaces the old entry instead of adding a twin (characters other than letters, digits,
  `.` and `_` in the host become `-`, so IPv6 literals give URL-safe IDs).
- The check is grpc.health.v1 for the service's fully-qualified gRPC name (MeshServer reports
  SERVING for it), over TLS verified against `TLSServerName` = the service name (a DNS SAN of every
  mesh leaf). `TLSSkipVerify` stays false. Interval and timeout come from the service's effective
  `health_check` (30 s / 5 s by default). MeshServer requires client certificates, so the agent
  must be configured with a certificate the mesh CA trusts (Consul uses its agent TLS settings for
  gRPC checks); in `--insecure` local mode pass `use_tls=False`.
- `DeregisterCriticalServiceAfter` (default 1m, Consul's reaper runs every 30 s, so less is not
  honoured) removes an instance whose process died without deregistering.
- Meta is `{"version": <service version>, **metadata}` and is validated against Consul's limits
  (keys `[A-Za-z0-9_-]`, at most 128 chars, not starting with `consul-`; values at most 512 chars;
  at most 64 pairs), so a bad key fails here rather than as an HTTP 400 at startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import consul
from consul.callback import CB

from aivo_mesh.config.model import (
    CONSUL_META_KEY,
    CONSUL_META_PAIRS_MAX,
    CONSUL_META_VALUE_MAX,
    MeshSpec,
    ServiceSpec,
    format_duration,
    parse_duration,
)
from aivo_mesh.config.resolve import service_policy
from aivo_mesh.discovery._util import in_daemon_thread
from aivo_mesh.discovery.consul import CONSUL_ERRORS, DEFAULT_ADDRESS, ConsulError, parse_address
from aivo_mesh.discovery.snapshot import Endpoint
from aivo_mesh.policy.backoff import EqualJitter

log = logging.getLogger(__name__)

REGISTER_PATH = "/v1/agent/service/register"
DEREGISTER_PATH = "/v1/agent/service/deregister/"
MIN_DEREGISTER_AFTER = 60.0

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._]+")
# 0.5 s doubling to 30 s, exactly: the ceiling of the policy back-off, no jitter, since each instance
# talks to its own local agent and there is no fleet of callers to spread.
REGISTER_BACKOFF = EqualJitter(base=0.5, cap=30.0)


def service_id(service: str, host: str, port: int) -> str:
    """`<service>-<host>-<port>`; runs of characters other than letters, digits, `.` and `_` in the
    host become one `-` (`fe80::1` -> `fe80-1`), so the ID is safe in the deregister URL."""
    host = host.strip("[]")
    return f"{service}-{_ID_UNSAFE.sub('-', host)}-{port}"


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration string in the largest whole unit: 3600 -> `1h`, 60 -> `1m`,
    30 -> `30s`, 0.25 -> `250ms` (what Consul's JSON decoder parses)."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return format_duration(seconds)


def _duration(value: float | str, what: str) -> str:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return go_duration(seconds)


def _meta(spec: ServiceSpec) -> dict[str, str]:
    # The model refuses such metadata with a located error (config/model.py); this guards a ServiceSpec
    # built without validation (model_copy) from becoming an HTTP 400 at startup.
    meta = {"version": spec.version, **spec.metadata}
    if len(meta) > CONSUL_META_PAIRS_MAX:
        raise ValueError(f"{spec.name}: Consul allows at most {CONSUL_META_PAIRS_MAX} Meta pairs, got {len(meta)}")
    for k, v in meta.items():
        if not CONSUL_META_KEY.match(k) or k.startswith("consul-"):
            raise ValueError(f"{spec.name}: metadata key {k!r} is not a valid Consul Meta key "
                             "(letters, digits, '_' and '-', at most 128, not starting with 'consul-')")
        if len(v) > CONSUL_META_VALUE_MAX:
            raise ValueError(f"{spec.name}: metadata {k!r} is longer than Consul's {CONSUL_META_VALUE_MAX} characters")
    return meta


def agent_service_definition(
    mesh: MeshSpec,
    service: str | ServiceSpec,
    address: str,
    port: int,
    *,
    tls_server_name: str | None = None,
    check_interval: float | str | None = None,
    check_timeout: float | str | None = None,
    deregister_critical_after: float | str = "1m",
    use_tls: bool = True,
) -> dict[str, Any]:
    """The body of `PUT /v1/agent/service/register` for one instance of `service` (pure, no I/O).

    `address`/`port` are where the agent and other instances reach this one (the mesh port, mTLS).
    Intervals default to the service's effective `health_check`; durations are seconds or strings
    such as `30s`/`100ms`/`1m` and are emitted in Consul (Go) duration syntax.
    """
    spec = service if isinstance(service, ServiceSpec) else mesh.service(service)
    health = service_policy(mesh, spec.name).health_check
    endpoint = Endpoint(address, port)  # validates; gives the bracketed host:port for IPv6
    deregister = parse_duration(deregister_critical_after)
    if deregister < MIN_DEREGISTER_AFTER:
        raise ValueError(f"deregister_critical_after must be at least 1m (Consul's reaper runs every 30s), "
                         f"got {deregister_critical_after!r}")
    check: dict[str, Any] = {
        "Name": f"{spec.name} gRPC health",
        "GRPC": f"{endpoint.address}/{spec.grpc_service}",
        "GRPCUseTLS": use_tls,
    }
    if use_tls:
        check["TLSServerName"] = tls_server_name or spec.name
        check["TLSSkipVerify"] = False
    check["Interval"] = _duration(health.interval if check_interval is None else check_interval, "check_interval")
    check["Timeout"] = _duration(health.timeout if check_timeout is None else check_timeout, "check_timeout")
    check["DeregisterCriticalServiceAfter"] = go_duration(deregister)
    return {
        "ID": service_id(spec.name, endpoint.host, port),
        "Name": spec.name,
        "Tags": list(spec.tags),
        "Address": endpoint.host,
        "Port": port,
        "Meta": _meta(spec),
        "Check": check,
    }


class ConsulRegistration:
    """Register and deregister this process's service instances with the local Consul agent.

    Requests go through py-consul's HTTP client (so `token`, TLS `verify` and the agent address are
    handled the same way as by `ConsulDiscovery`), but the body is `agent_service_definition`
    verbatim: py-consul's `agent.service.register` would rename the keys and drop `TLSServerName`.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        scheme: str = "http",
        token: str | None = None,
        *,
        verify: bool | str = True,
        timeout: float = 10.0,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.host, self.port, self.scheme = parse_address(address, scheme)
        self.token = token
        self.verify = verify
        self.timeout = timeout
        self._client_factory = client_factory or self._default_client
        self.registered: list[str] = []

    def _default_client(self) -> Any:
        return consul.Consul(host=self.host, port=self.port, scheme=self.scheme, token=self.token,
                             verify=self.verify, connections_timeout=self.timeout)

    async def register(
        self,
        mesh: MeshSpec,
        service: str | ServiceSpec,
        *,
        address: str,
        port: int,
        tls_server_name: str | None = None,
        check_interval: float | str | None = None,
        check_timeout: float | str | None = None,
        deregister_critical_after: float | str = "1m",
        use_tls: bool = True,
        replace_existing_checks: bool = True,
    ) -> str:
        """Register one instance; returns its service ID. Raises ConsulError if the agent refuses."""
        definition = agent_service_definition(
            mesh, service, address, port, tls_server_name=tls_server_name, check_interval=check_interval,
            check_timeout=check_timeout, deregister_critical_after=deregister_critical_after, use_tls=use_tls)
        params = [("replace-existing-checks", "true")] if replace_existing_checks else []
        ok = await self._call("register", definition["ID"], self._put, REGISTER_PATH, params,
                              json.dumps(definition))
        if not ok:
            raise ConsulError(f"Consul agent {self.scheme}://{self.host}:{self.port}: register "
                              f"{definition['ID']} failed: the agent answered 404 (no agent API here?)")
        if definition["ID"] not in self.registered:
            self.registered.append(definition["ID"])
        return str(definition["ID"])

    async def deregister(self, service_id: str) -> bool:
        """Remove an instance (and its checks). False if the agent did not know the ID."""
        found = await self._call("deregister", service_id, self._put, DEREGISTER_PATH + service_id, [], "")
        if service_id in self.registered:
            self.registered.remove(service_id)
        return bool(found)

    async def deregister_all(self) -> None:
        """Deregister every instance this object registered (shutdown)."""
        for sid in list(self.registered):
            await self.deregister(sid)

    async def agent_services(self) -> dict[str, Any]:
        """`GET /v1/agent/services`: what the local agent has registered, by ID."""
        client = self._client_factory()
        result = await self._call("list services", "", client.agent.services)
        return dict(result or {})

    # -- internals -------------------------------------------------------------------------------
    def _put(self, path: str, params: list[tuple[str, str]], body: str) -> bool:
        client = self._client_factory()
        headers = client.prepare_headers(self.token)
        return bool(client.http.put(CB.boolean(), path, params=params, headers=headers, data=body))

    async def _call(self, what: str, sid: str, fn: Callable[..., Any], *args: object) -> Any:
        try:
            return await in_daemon_thread(fn, *args)
        except CONSUL_ERRORS as e:
            where = f"{self.scheme}://{self.host}:{self.port}"
            raise ConsulError(f"Consul agent {where}: {what} {sid} failed: {type(e).__name__}: {e}") from e


class BackgroundRegistration:
    """Keep one instance registered from a background task; deregister it on `close()`.

    `start()` returns at once: an agent that is away for a moment (restarting, not up yet) must not
    keep the service from serving, so registration retries with back-off (0.5 s doubling to 30 s).
    Consul routes to the instance once it is registered and its health check passes.

    `close()` removes the instance whenever an attempt was *sent*, not only when one was answered:
    the agent may have applied a register whose answer had not arrived yet (the request runs in a
    thread that cancelling the task cannot stop). So it first waits, at most `settle` seconds, for an
    attempt on the wire, then deregisters the ID (deterministic, `service_id`); an agent answering
    "unknown ID" is fine. If the attempt is still unanswered after `settle`, a register landing
    after the deregister leaves an entry whose check fails; Consul reaps it after
    `DeregisterCriticalServiceAfter` (1m).
    """

    def __init__(self, registration: ConsulRegistration, mesh: MeshSpec, service: str, *, address: str,
                 port: int, use_tls: bool = True, settle: float = 2.0) -> None:
        self.registration = registration
        self.service = service
        self.service_id = service_id(service, address, port)
        self._mesh, self._address, self._port, self._use_tls = mesh, address, port, use_tls
        self._settle = settle
        self._task: asyncio.Task[None] | None = None
        self._attempt: asyncio.Future[str] | None = None
        self.registered = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"consul-register-{self.service}")

    async def _run(self) -> None:
        failures = 0
        while True:
            self._attempt = asyncio.ensure_future(self.registration.register(
                self._mesh, self.service, address=self._address, port=self._port, use_tls=self._use_tls))
            try:
                sid = await self._attempt
            except ConsulError as exc:
                failures += 1
                delay = REGISTER_BACKOFF.ceiling(failures)
                log.warning("%s: Consul registration failed (%s); retrying in %.1fs", self.service, exc, delay)
                await asyncio.sleep(delay)
                continue
            self.registered = True
            log.info("%s registered in Consul as %s", self.service, sid)
            return

    async def close(self) -> None:
        """Stop retrying and deregister (if any attempt was sent). An agent's refusal is logged, not
        raised: this runs on shutdown."""
        task, attempt = self._task, self._attempt
        if task is None:
            return
        self._task = None
        if attempt is not None and not attempt.done():
            await asyncio.wait([attempt], timeout=self._settle)  # not cancelled: let the answer arrive
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if attempt is None:
            return
        try:
            await self.registration.deregister(self.service_id)
        except ConsulError as exc:
            log.warning("%s: Consul deregistration of %s failed (%s); Consul removes it once its check has "
                        "been critical for DeregisterCriticalServiceAfter", self.service, self.service_id, exc)
        self.registered = False
