"""The planes a conformance scenario runs on, each with real processes on 127.0.0.1.

learner-svc calls auth-svc. Each side is proxyless (a MeshClient, or MeshServers) or a sidecar (a real
Envoy 1.40 on the control plane, the app behind or in front of it playing the service):

    proxyless              MeshClient -> MeshServer, both reading mesh.yaml (no control plane), as an
                           application that builds `MeshClient(MeshConfig(...))` runs
    proxyless-xds          the same processes on the control plane (ProxylessNode), as `meshctl up --plane
                           proxyless` runs them: the policy arrives as xDS resources
    sidecar                app -> learner's Envoy -> auth's Envoy -> app, as `meshctl up --plane sidecar`
    proxyless-to-sidecar   MeshClient on the control plane -> auth's Envoy -> app
    sidecar-to-proxyless   app -> learner's Envoy -> auth's MeshServer on the control plane
    grpc-xds               gRPC's own xDS client (`xds:///auth-svc`, GRPC_XDS_BOOTSTRAP from `meshctl xds
                           bootstrap`), a plain grpc.aio application in a process of its own -> auth's
                           MeshServer on the control plane

The called app is one `Script` whatever the plane: it counts attempts per call (the payload names the call)
and does what the phase's Behaviour says. Instances past the first are more auth-svc front doors: MeshServers,
or an Envoy (a static bootstrap of the same mesh on other ports) with its own app.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config import MeshSpec
from aivo_mesh.config.loader import parse_mesh
from aivo_mesh.config.model import EndpointSpec, to_data
from aivo_mesh.config.resolve import fault_policies, inbound_rate_limits
from aivo_mesh.conformance.scenario import PLANES, SERVICE, Behaviour, Scenario
from aivo_mesh.pki import CertLayout
from aivo_mesh.runtime.control_plane import ControlPlane
from aivo_mesh.runtime.local import dump_mesh, with_free_ports
from aivo_mesh.runtime.mesh import envoy_binary, local_profile, write_envoy_configs
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.runtime.status import envoy_hosts, envoy_ready
from aivo_mesh.server import MeshServer
from aivo_mesh.xds.node import ProxylessNode, apply_to
from aivo_mesh.xds.proxyless import grpc_bootstrap

CALLER, CALLED = "learner-svc", "auth-svc"

# The grpc-xds plane's caller: plain grpc, as any application would write it. One JSON line in per call (an id,
# a method, a payload; calls run concurrently, without a deadline: the route's applies), one JSON line out.
GRPC_XDS_CLIENT = r"""
import asyncio, json, sys, time
import grpc

async def main():
    # Fallback credentials no mesh server accepts: a call that succeeds was secured as the control plane said.
    creds = grpc.xds_channel_credentials(fallback_credentials=grpc.ssl_channel_credentials())
    channel = grpc.aio.secure_channel("xds:///auth-svc", creds)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = set()
    # Ready once the listener, routes, cluster and endpoints arrived and the connection is up: no call
    # is spent on it (a rate limit's bucket stays full).
    await asyncio.wait_for(channel.channel_ready(), 30)
    print(json.dumps({"ready": True}), flush=True)

    async def one(ask):
        rpc = channel.unary_unary(ask["method"])
        started = time.monotonic()
        try:
            reply = await rpc(ask["payload"].encode())
            out = {"code": "OK", "reply": reply.decode(), "details": "", "trailers": []}
        except grpc.aio.AioRpcError as exc:
            out = {"code": exc.code().name, "reply": None, "details": exc.details() or "",
                   "trailers": [k for k, _ in (exc.trailing_metadata() or ())]}
        out.update(id=ask["id"], seconds=time.monotonic() - started)
        print(json.dumps(out), flush=True)

    while line := await reader.readline():
        task = asyncio.create_task(one(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)

asyncio.run(main())
"""


class GrpcXdsCaller:
    """The GRPC_XDS_CLIENT process: calls in, replies matched to them by id."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc, self.stderr = proc, stderr
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        ready = await self.proc.stdout.readline()
        if not ready:
            self.ready.set_exception(AssertionError(f"the client exited: {self.stderr.read_text()[-3000:]}"))
            return
        self.ready.set_result(None)
        while line := await self.proc.stdout.readline():
            got = json.loads(line)
            self.waiting.pop(got["id"]).set_result(got)
        for future in self.waiting.values():
            future.set_exception(AssertionError(f"the client exited: {self.stderr.read_text()[-3000:]}"))

    async def call(self, method: str, payload: bytes) -> Reply:
        assert self.proc.stdin is not None
        self.next_id += 1
        future = self.waiting[self.next_id] = asyncio.get_running_loop().create_future()
        ask = {"id": self.next_id, "method": f"/{SERVICE}/{method}", "payload": payload.decode()}
        self.proc.stdin.write(json.dumps(ask).encode() + b"\n")
        await self.proc.stdin.drain()
        got = await asyncio.wait_for(future, 60)
        return Reply(got["code"], got["details"], got["seconds"], got["reply"], tuple(got["trailers"]))

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await self.reader


async def grpc_xds_caller(mesh: MeshSpec, certs: CertLayout, d: Path) -> GrpcXdsCaller:
    bootstrap_file = d / "learner-xds.json"
    cert, key = certs.identity_paths(CALLER)
    bootstrap_file.write_text(json.dumps(grpc_bootstrap(mesh, CALLER, mesh.control_plane.address, cert=cert,
                                                        key=key, ca=certs.ca_cert)))
    stderr = d / "grpc-xds-client.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", GRPC_XDS_CLIENT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=err, env={**{k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"},
                             "GRPC_XDS_BOOTSTRAP": str(bootstrap_file)})
    return GrpcXdsCaller(proc, stderr)


# What every scenario starts from (it overrides any key): quick back-off, and breaker, ejection and health
# checks out of the way unless a scenario is about them.
BASE_DEFAULTS: dict[str, Any] = {
    "timeout": "5s",
    "retry": {"max_retries": 2, "backoff": {"base": "10ms", "max": "50ms"}, "retry_on": ["UNAVAILABLE"]},
    "retry_budget": {"percent": 25, "min_retry_concurrency": 3, "window": "10s"},
    "circuit_breaker": {"consecutive_failures": 1000, "first_probe": "100ms", "recovery_time": "1s"},
    "limits": {"max_connections": 1000, "max_pending_requests": 100, "max_requests": 1000, "max_retries": 100},
    "outlier_detection": {"consecutive_failures": 1000, "interval": "1s", "base_ejection_time": "1s",
                          "max_ejection_time": "60s", "max_ejection_percent": 100},
    "health_check": {"interval": "30s", "timeout": "5s"},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def mesh_doc(scenario: Scenario, base: Mapping[str, Any]) -> dict[str, Any]:
    """`base` (the platform's mesh.yaml, as data) with the scenario's defaults, and auth-svc's policy, routes
    and allow rules."""
    doc: dict[str, Any] = copy.deepcopy(dict(base))
    doc["defaults"] = _merge(BASE_DEFAULTS, dict(scenario.defaults))
    auth = next(s for s in doc["services"] if s["name"] == CALLED)
    for key in ("timeout", "retry", "retry_budget", "circuit_breaker", "limits", "outlier_detection",
                "health_check", "fault", "routes", "canary"):
        auth.pop(key, None)
    auth.update(copy.deepcopy(dict(scenario.policy)))
    auth["routes"] = [dict(r) for r in scenario.routes]
    auth["allow"] = ([dict(a) for a in scenario.allow] if scenario.allow is not None
                     else [{"from": [CALLER, "mesh-client"]}])
    return doc


# -- the called app ------------------------------------------------------------------------------------------

@dataclass
class Script:
    """auth-svc's app on every instance: what reached it, and what it does (the phase's Behaviour)."""

    behaviour: Behaviour = field(default_factory=Behaviour)
    attempts: Counter[bytes] = field(default_factory=Counter)
    reached: int = 0

    def handler(self, instance: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            self.attempts[request] += 1
            self.reached += 1
            b = self.behaviour
            if b.applies(self.attempts[request], instance):
                if b.delay:
                    await asyncio.sleep(b.delay)
                if b.fail is not None:
                    trailers = (("grpc-retry-pushback-ms", str(b.pushback_ms)),) if b.pushback_ms is not None else ()
                    await context.abort(getattr(grpc.StatusCode, b.fail), f"{b.fail} from {instance}",
                                        trailing_metadata=trailers)
            return instance.encode()

        return handle

    def methods(self, instance: str) -> dict[str, Callable[[bytes, Any], Awaitable[bytes]]]:
        return {"ValidateToken": self.handler(instance), "Authenticate": self.handler(instance)}


# -- a running plane -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    code: str
    details: str
    seconds: float
    answered_by: str | None
    trailers: tuple[str, ...]


Call = Callable[[str, bytes], Awaitable[Reply]]


@dataclass
class World:
    plane: str
    mesh: MeshSpec
    script: Script
    call: Call
    stops: dict[str, Callable[[], Awaitable[None]]]  # instance -> stop it
    remove: Callable[[str], Awaitable[None]]  # instance -> out of mesh.yaml's endpoints, live
    change: Callable[[Mapping[str, Any]], Awaitable[None]]  # auth-svc's keys set to these values, live

    async def stop(self, instance: str) -> None:
        await self.stops.pop(instance)()


def _raw(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)


async def _timed(rpc: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], payload: bytes) -> Reply:
    started = time.monotonic()
    try:
        # No deadline of the caller's own below the route's (30 s): the route's deadline is what is observed.
        answer = await rpc(payload, timeout=30)
        return Reply("OK", "", time.monotonic() - started, answer.decode(), ())
    except grpc.aio.AioRpcError as exc:
        trailers = tuple(k for k, _ in (exc.trailing_metadata() or ()))
        return Reply(exc.code().name, exc.details() or "", time.monotonic() - started, None, trailers)


class _Stack:
    """What a world started, stopped in reverse order."""

    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()
        self.envoys: list[asyncio.subprocess.Process] = []

    async def envoy(self, config: Path, admin: int) -> None:
        # One worker thread and no hot restart, so that several run side by side on one machine. Its errors
        # go to a file beside the config: a sidecar that does not start says why (a port taken meanwhile...).
        log_path = config.with_suffix(".stderr.log")
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                envoy_binary(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
                "--log-level", "error", stdout=asyncio.subprocess.DEVNULL, stderr=log_file)
        self.envoys.append(proc)

        async def stop() -> None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()

        self.stack.push_async_callback(stop)

        async def live() -> bool:
            if proc.returncode is not None:
                said = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"envoy -c {config} exited with {proc.returncode}: " + " | ".join(said))
            return await asyncio.to_thread(envoy_ready, f"127.0.0.1:{admin}")

        await until(live, 60, f"the Envoy of {config} is LIVE")


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Return once `condition()` holds; RuntimeError after `timeout` seconds (a bound, never a bare sleep)."""
    try:
        async with asyncio.timeout(timeout):
            # Other processes' state (an HTTP answer, a port): nothing to await but the next look.
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise RuntimeError(f"{what}: not within {timeout:g}s") from None


async def serve_app(methods: Mapping[str, Callable[[bytes, Any], Awaitable[bytes]]], port: int = 0,
                    credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    """auth-svc's app: AuthService's `methods` as raw bytes on 127.0.0.1:`port` (0: a free one), plaintext
    unless `credentials` (behind a sidecar it is), and grpc.health.v1 reporting AuthService SERVING, as the
    sidecars' and MeshClient's health checks ask. The started server and its port."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in methods.items()}),))
    checker = health.aio.HealthServicer()
    await checker.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    address = f"127.0.0.1:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    return server, bound


@contextlib.asynccontextmanager
async def world(plane: str, scenario: Scenario, base: Mapping[str, Any], certs: CertLayout,
                tmp_path: Path) -> AsyncIterator[World]:
    """`scenario`'s mesh (on `base`, the platform's mesh.yaml as data) running on `plane` with the certificates
    of `certs`, its files under `tmp_path`; stopped when the block ends."""
    caller_side, called_side, xds = PLANES[plane]
    doc = mesh_doc(scenario, base)
    mesh = with_free_ports(parse_mesh(yaml.safe_dump(doc, sort_keys=False), "mesh.yaml"))
    state = StateDir(tmp_path / "state")
    state.ensure()
    shutil.copytree(certs.root, state.certs.root, dirs_exist_ok=True)
    certs = state.certs
    script = Script()
    stacks = _Stack()
    async with stacks.stack:
        # Instances past the first: their front doors, known before the mesh is final (its endpoints).
        extra: dict[str, tuple[str, MeshSpec | None]] = {}
        for name in scenario.instances[1:]:
            fresh = with_free_ports(mesh)  # fresh ports for this instance's server (and sidecar)
            port = (fresh.service(CALLED).sidecar.inbound_port if called_side == "sidecar"
                    else fresh.service(CALLED).port)
            extra[name] = (f"127.0.0.1:{port}", fresh)
        first = scenario.instances[0]
        front = (f"127.0.0.1:{mesh.service(CALLED).sidecar.inbound_port}" if called_side == "sidecar"
                 else f"127.0.0.1:{mesh.service(CALLED).port}")
        endpoints: dict[str, Any] = {}  # instance -> its entry in mesh.yaml's endpoints
        if extra or scenario.versions:
            for name, address in [(first, front), *((n, a) for n, (a, _) in extra.items())]:
                version = scenario.versions.get(name)
                endpoints[name] = address if version is None else EndpointSpec(address=address, version=version)
            mesh = _with_endpoints(mesh, endpoints.values())
        state.mesh_file.write_text(dump_mesh(mesh))

        # The called side: each instance's app.
        stops: dict[str, Callable[[], Awaitable[None]]] = {}
        servers: dict[str, MeshServer] = {}
        for name in scenario.instances:
            address, other = (front, None) if name == first else extra[name]
            port = int(address.rpartition(":")[2])
            if called_side == "proxyless":
                server = MeshServer.for_service(mesh, CALLED, certs, host="127.0.0.1", port=port)
                server.grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                    SERVICE, {m: grpc.unary_unary_rpc_method_handler(h) for m, h in script.methods(name).items()}),))
                server.add_service_name(SERVICE)
                await server.start()
                servers[name] = server
                stops[name] = _stopper(server)
            else:
                owner = mesh if other is None else other
                app, _ = await serve_app(script.methods(name), port=owner.service(CALLED).local_port)
                stops[name] = _stopper(app)
                if other is not None:
                    admin = other.service(CALLED).sidecar.admin_port
                    assert admin is not None
                    # A static bootstrap of the same mesh on other ports, as `meshctl up` writes it without a
                    # control plane.
                    instance_state = StateDir(tmp_path / f"instance-{name}")
                    instance_state.ensure()
                    shutil.copytree(certs.root, instance_state.certs.root, dirs_exist_ok=True)
                    bootstraps = write_envoy_configs(instance_state, other, None, None)
                    await stacks.envoy(bootstraps[CALLED], admin)
            stacks.stack.push_async_callback(_stop_if_running, stops, name)

        # The control plane and the sidecars.
        sidecars = [n for n, side in ((CALLER, caller_side), (CALLED, called_side)) if side == "sidecar"]
        cp: ControlPlane | None = None
        client: MeshClient | None = None

        current = mesh

        async def change(keys: Mapping[str, Any]) -> None:
            """auth-svc's `keys` set as a user edits mesh.yaml, then applied live: `meshctl apply` where a control
            plane runs (every node has ACKed it when it returns), else what an app reading mesh.yaml calls."""
            nonlocal current
            data = yaml.safe_load(dump_mesh(current))
            next(s for s in data["services"] if s["name"] == CALLED).update(copy.deepcopy(dict(keys)))
            current = parse_mesh(yaml.safe_dump(data, sort_keys=False), "mesh.yaml")
            if cp is not None:
                result = await cp.apply(dump_mesh(current))
                assert result["nodes"] and all(n["outcome"] == "acked" for n in result["nodes"]), result
                return
            assert client is not None
            client.apply_policies(current)
            for server in servers.values():
                server.update_authorizer(current)
                server.set_faults(fault_policies(current, CALLED))
                server.set_rate_limits(inbound_rate_limits(current, CALLED))

        async def remove(instance: str) -> None:
            del endpoints[instance]
            await change({"endpoints": [e if isinstance(e, str) else to_data(e, exclude_none=True)
                                        for e in endpoints.values()]})

        if xds:
            write_envoy_configs(state, mesh, None, None, control_plane=True)
            direct = [n for n, side in ((CALLER, caller_side), (CALLED, called_side)) if side == "proxyless"]
            cp = ControlPlane(state, lambda m, name: local_profile(state, name, None, None), direct=direct)
            await cp.start()
            stacks.stack.push_async_callback(cp.stop)
            for name in sidecars:
                admin = mesh.service(name).sidecar.admin_port
                assert admin is not None
                await stacks.envoy(state.root / "envoy" / name / "envoy.yaml", admin)
            if called_side == "proxyless":
                for server in servers.values():
                    own = MeshClient(MeshConfig.for_identity(CALLED, certs, mesh))  # calls nobody; the node wants one
                    stacks.stack.push_async_callback(own.close)
                    await _node(stacks.stack, mesh, certs, CALLED, own, server)

        # The caller.
        if caller_side == "grpc-xds":
            xds_caller = await grpc_xds_caller(mesh, certs, tmp_path)
            stacks.stack.push_async_callback(xds_caller.close)
            await asyncio.wait_for(xds_caller.ready, 40)
            yield World(plane, mesh, script, xds_caller.call, stops, remove, change)
            return
        if caller_side == "proxyless":
            client = MeshClient(MeshConfig.for_identity(CALLER, certs, mesh))
            stacks.stack.push_async_callback(client.close)
            if xds:
                await _node(stacks.stack, mesh, certs, CALLER, client, None)
            channel = await client.channel(CALLED)
        else:
            outbound = mesh.service(CALLER).sidecar.outbound_port
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{outbound}")
            stacks.stack.push_async_callback(channel.close)
            admin = mesh.service(CALLER).sidecar.admin_port
            hosts = len(scenario.instances)
            await until(lambda: asyncio.to_thread(_healthy, admin, hosts), timeout=60,
                        what=f"{CALLER}'s sidecar sees {hosts} healthy auth-svc hosts")

        async def call(method: str, payload: bytes) -> Reply:
            return await _timed(_raw(channel, method), payload)

        yield World(plane, mesh, script, call, stops, remove, change)


def _with_endpoints(mesh: MeshSpec, endpoints: Iterable[Any]) -> MeshSpec:
    """`mesh` with auth-svc's `endpoints`, validated again as a user's file would be."""
    changed = mesh.model_copy(update={"services": tuple(
        s.model_copy(update={"endpoints": tuple(endpoints)}) if s.name == CALLED else s for s in mesh.services)})
    return parse_mesh(dump_mesh(changed), "mesh.yaml")


def _healthy(admin: int | None, hosts: int) -> bool:
    try:
        found = envoy_hosts(f"127.0.0.1:{admin}")
    except (OSError, ValueError):
        return False
    flags = [flag for cluster, known in found.items() if cluster.startswith(CALLED) for flag in known.values()]
    return len(flags) >= hosts and set(flags) == {"healthy"}


async def _node(stack: contextlib.AsyncExitStack, mesh: MeshSpec, certs: CertLayout, service: str,
                client: MeshClient, server: MeshServer | None) -> None:
    cert, key = certs.identity_paths(service)
    node = ProxylessNode(mesh, service, mesh.control_plane.address, cert=cert, key=key, ca=certs.ca_cert,
                         apply=apply_to(client, server))
    node.start()
    stack.push_async_callback(node.stop)
    assert await node.wait_applied(15), node.status()


def _stopper(server: grpc.aio.Server | MeshServer) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        await server.stop(0)

    return stop


async def _stop_if_running(stops: dict[str, Callable[[], Awaitable[None]]], name: str) -> None:
    if name in stops:
        await stops.pop(name)()
