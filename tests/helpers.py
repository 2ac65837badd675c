"""Helpers several test modules share: running meshctl, a local mesh, an auth-svc stand-in, Envoy.

Beside it: binaries.py locates external programs (and decides skip or fail), waiting.py waits on a
condition with a bound. Free ports come from the product itself (`aivo_mesh.runtime.local.free_port`
and `free_ports`), as `meshctl up --free-ports` picks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import grpc
from binaries import require

from aivo_mesh.runtime.supervisor import Supervisor, meshctl_argv

if TYPE_CHECKING:
    from aivo_mesh.client import MeshClient
    from aivo_mesh.config import MeshSpec
    from aivo_mesh.render.envoy import EnvoyProfile
    from aivo_mesh.runtime.state import StateDir

ROOT = Path(__file__).resolve().parents[1]
AUTH_SERVICE = "aivo.auth.v1.AuthService"


# -- meshctl ------------------------------------------------------------------------------------------

def checkout_env(unset: Iterable[str] = (), extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without `unset`, plus `extra`, importing this checkout's aivo_mesh
    first whatever the working directory."""
    env = {k: v for k, v in os.environ.items() if k not in set(unset)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **(extra or {})}


def interruptible() -> None:
    """`preexec_fn` for a child a test will Ctrl-C (SIGINT): SIGINT at its default, as in a terminal's
    foreground process. Run as a shell's background job (`make test &`), the tests inherit SIGINT
    ignored, an ignored signal stays ignored across exec, and a Python child then never sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@functools.cache
def can_batch() -> bool:
    """Whether a process here may take Linux's SCHED_BATCH (what `aivo_mesh.run` asks for): Linux, and no
    seccomp profile or LSM refusing it. Probed in a child: a process's policy is process-wide."""
    from aivo_mesh import scheduling

    if not scheduling.supported():
        return False
    probe = "import os; os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def meshctl(*args: str, cwd: Path = ROOT, timeout: float = 120, unset: Iterable[str] = (),
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`meshctl ARGS` run by this interpreter from this checkout, output captured; the caller checks the
    exit code. `unset` and `env` adjust the environment (checkout_env)."""
    return subprocess.run(meshctl_argv(*args), cwd=cwd, env=checkout_env(unset, env), capture_output=True,
                          text=True, timeout=timeout, check=False)


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, and SIGKILL if `proc` has not exited within `timeout` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# -- a local mesh ---------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def serving_local_mesh(state: StateDir) -> AsyncIterator[tuple[MeshSpec, Supervisor, MeshClient]]:
    """The repository's mesh.yaml on free ports, prepared in `state` and run as local processes
    (proxyless), every service SERVING; yields it, its supervisor and a mesh-client MeshClient. Every
    process is stopped on exit."""
    # Imported here: most modules that use these helpers never start a mesh.
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.runtime.health import wait_serving
    from aivo_mesh.runtime.local import prepare, start_services

    mesh = prepare(state, str(ROOT / "mesh.yaml"), free_ports=True)
    sup = Supervisor(state)
    try:
        await start_services(sup, mesh)
        async with MeshClient(MeshConfig.for_identity("mesh-client", state.certs, mesh)) as client:
            health = await wait_serving(client, mesh.service_names, timeout=90)
            assert set(health.values()) == {"SERVING"}, health
            yield mesh, sup, client
    finally:
        await sup.stop_all()


# -- an auth-svc stand-in -----------------------------------------------------------------------------

Method = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


async def auth_app(methods: Mapping[str, Method], *, port: int = 0,
                   credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server on 127.0.0.1:`port` (0: a free one) answering AuthService's `methods` (raw
    bytes, by method name), with grpc.health.v1 reporting AuthService SERVING: the conformance suite's app
    (`aivo_mesh.conformance.planes.serve_app`). Plaintext unless `credentials`. The server and its port."""
    from aivo_mesh.conformance.planes import serve_app

    return await serve_app(methods, port, credentials)


# -- Envoy ----------------------------------------------------------------------------------------------

def envoy_argv(config: Path, *, log_level: str = "error", extra: Sequence[str] = ()) -> list[str]:
    """Envoy as the tests run it: one worker thread, and no hot restart, so several run side by side."""
    return [require("envoy"), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
            "--log-level", log_level, *extra]


def start_envoy(config: Path, *, log_level: str = "error", stderr: int | IO[Any] = subprocess.DEVNULL,
                ) -> subprocess.Popen[bytes]:
    return subprocess.Popen(envoy_argv(config, log_level=log_level), stdout=subprocess.DEVNULL, stderr=stderr)


async def start_envoy_async(config: Path, *, log_level: str = "error",
                            extra: Sequence[str] = ()) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*envoy_argv(config, log_level=log_level, extra=extra),
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)


def envoy_live(admin: int) -> bool:
    """Envoy's admin endpoint on 127.0.0.1:`admin` answers /ready with LIVE."""
    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
        return bool(r.status == 200 and r.read().decode().strip() == "LIVE")
    return False


def wait_envoy_live(admin: int, proc: subprocess.Popen[bytes] | asyncio.subprocess.Process | None = None,
                    timeout: float = 60.0) -> None:
    """Block until `envoy_live(admin)`; fail at once if `proc` exits meanwhile, or after `timeout`. Blocking:
    async tests run it in a thread (an Envoy starting under load may take seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if isinstance(proc, subprocess.Popen):
            proc.poll()
        if proc is not None and proc.returncode is not None:
            raise AssertionError(f"envoy exited early with {proc.returncode}")
        if envoy_live(admin):
            return
        time.sleep(0.05)  # an external process: nothing to wait on but its HTTP answer
    raise AssertionError(f"envoy admin on {admin} not LIVE after {timeout:g}s")


def on_free_ports(mesh: MeshSpec) -> MeshSpec:
    """`mesh` with every local_port and sidecar port moved to a currently free port (the rest of each
    service's `sidecar` block kept)."""
    from aivo_mesh.runtime.local import free_ports

    ports = iter(free_ports(4 * len(mesh.services)))
    services = tuple(
        s.model_copy(update={"local_port": next(ports), "sidecar": s.sidecar.model_copy(update={
            "inbound_port": next(ports), "outbound_port": next(ports), "admin_port": next(ports)})})
        for s in mesh.services
    )
    return mesh.model_copy(update={"services": services})


def write_sidecar(mesh: MeshSpec, service: str, profile: EnvoyProfile, config_path: Path) -> Path:
    """Write `service`'s bootstrap to `config_path` and its SDS files into profile.sds_dir."""
    from aivo_mesh.render import serialize
    from aivo_mesh.render.envoy import bootstrap, sds_files

    sds = Path(profile.sds_dir)
    sds.mkdir(parents=True, exist_ok=True)
    for name, doc in sds_files(mesh, service, profile).items():
        (sds / name).write_text(serialize(name, doc))
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(serialize(config_path.name, bootstrap(mesh, service, profile)))
    return config_path
