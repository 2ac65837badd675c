"""What stops a process from starting is one line naming the port or file, exit code 2, no traceback:
`meshctl serve` with a port in use or an unusable HMAC key, port options out of range, and `meshctl up`'s
preflight (certificates and ports checked before anything starts)."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import meshctl

from aivo_mesh.config import load_mesh
from aivo_mesh.errors import PkiError, StartupError
from aivo_mesh.pki import CertLayout
from aivo_mesh.runtime import mesh as runtime_mesh
from aivo_mesh.runtime.local import free_port, preflight, prepare
from aivo_mesh.runtime.mesh import plan
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.services.auth import KEY_ENV, KEY_FILE, AuthKeyError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another process (this one) listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def serve(tmp_path: Path, certs: CertLayout, *args: str, env: dict[str, str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    """`meshctl serve auth-svc` on free ports unless `args` say otherwise; it must exit by itself."""
    argv = ["serve", "auth-svc", "--config", str(ROOT / "mesh.yaml"), "--certs", str(certs.root), "--log-format",
            "text", *args]
    if "--port" not in args:
        argv += ["--port", str(free_port())]
    if "--admin-port" not in args:
        argv += ["--admin-port", str(free_port())]
    if "--data-dir" not in args:
        argv += ["--data-dir", str(tmp_path / "data")]
    return meshctl(*argv, cwd=tmp_path, timeout=60, unset=[KEY_ENV], env=env)


def _error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("AIVO_MESH_SCHEDULING", "fast", "auto, batch, inherit"),
    ("AIVO_MESH_EVENT_LOOP", "trio", "auto, uvloop, asyncio"),
])
def test_a_bad_runtime_variable_starts_nothing(tmp_path: Path, mesh_certs: CertLayout, variable: str, value: str,
                                               expected: str) -> None:
    proc = serve(tmp_path, mesh_certs, env={variable: value})
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc) == [f"error: environment: {variable}: {value!r}: expected one of {expected}"]
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_grpc_port_in_use(tmp_path: Path, mesh_certs: CertLayout, taken_port: int) -> None:
    proc = serve(tmp_path, mesh_certs, "--port", str(taken_port))
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc) == [f"error: port {taken_port} in use: auth-svc (gRPC) cannot listen on "
                                  f"127.0.0.1:{taken_port} (another process has it)"]


def test_admin_port_in_use_starts_nothing(tmp_path: Path, mesh_certs: CertLayout, taken_port: int) -> None:
    proc = serve(tmp_path, mesh_certs, "--admin-port", str(taken_port))
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc) == [f"error: port {taken_port} in use: auth-svc (admin endpoint) cannot listen on "
                                  f"127.0.0.1:{taken_port} (another process has it)"]
    assert "serving on" not in proc.stderr  # checked before the gRPC server bound


def test_unix_socket_in_use_starts_nothing(tmp_path: Path, mesh_certs: CertLayout) -> None:
    path = tmp_path / "auth-svc.app.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        proc = serve(tmp_path, mesh_certs, "--insecure", "--unix-socket", str(path))
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc) == [f"error: unix:{path} in use: auth-svc (gRPC) cannot listen there "
                                  "(another process has it)"]


async def test_a_service_process_stops_what_it_started_when_it_fails_and_when_it_leaves(
        tmp_path: Path, mesh_certs: CertLayout, taken_port: int) -> None:
    from aivo_mesh.runtime.local import listen_problem
    from aivo_mesh.runtime.serve import ServeOptions, ServiceProcess

    mesh = load_mesh(ROOT / "mesh.yaml")
    grpc_port, admin_port = free_port(), free_port()

    def listened(port: int) -> bool:
        return listen_problem("127.0.0.1", port, "probe") is not None

    with pytest.raises(StartupError, match=f"port {taken_port} in use"):
        async with ServiceProcess(mesh, "auth-svc", mesh_certs, tmp_path / "data",
                                  ServeOptions(port=grpc_port, admin_port=taken_port)):
            pass
    assert not listened(grpc_port)
    async with ServiceProcess(mesh, "auth-svc", mesh_certs, tmp_path / "data",
                              ServeOptions(port=grpc_port, admin_port=admin_port, grace=0)):
        assert listened(grpc_port) and listened(admin_port)
    assert not listened(grpc_port) and not listened(admin_port)


def test_certificate_overrides_are_resolved_file_by_file(mesh_certs: CertLayout) -> None:
    from aivo_mesh.runtime.serve import ServeOptions

    cert, key = mesh_certs.identity_paths("auth-svc")
    assert ServeOptions().identity_files(mesh_certs, "auth-svc") == (cert, key, mesh_certs.ca_cert)
    ca = Path("/etc/aivo/ca.pem")  # CA_CERT_PATH alone: the service's own certificate and key stay
    assert ServeOptions(ca=ca).identity_files(mesh_certs, "auth-svc") == (cert, key, ca)


@pytest.mark.parametrize(("key", "reason"), [
    ("zz" * 32, "not a hex-encoded key"),
    ("ab" * 16, "key must be at least 32 bytes, got 16"),
])
def test_bad_hmac_key_from_the_environment(tmp_path: Path, mesh_certs: CertLayout, key: str, reason: str) -> None:
    proc = serve(tmp_path, mesh_certs, env={KEY_ENV: key})
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc) == [f"error: ${KEY_ENV}: {reason}"]
    assert key not in proc.stderr + proc.stdout


def test_bad_hmac_key_file(tmp_path: Path, mesh_certs: CertLayout) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / KEY_FILE).write_text("not a key\n")
    (data / KEY_FILE).chmod(0o600)
    proc = serve(tmp_path, mesh_certs, "--data-dir", str(data))
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc) == [f"error: {data / KEY_FILE}: not a hex-encoded key"]


def test_auth_key_error_is_a_pki_error_naming_its_source() -> None:
    err = AuthKeyError("/x/auth-hmac.key", "not a hex-encoded key")
    assert isinstance(err, PkiError)
    assert (err.file, str(err)) == ("/x/auth-hmac.key", "/x/auth-hmac.key: not a hex-encoded key")


@pytest.mark.parametrize("argv", [
    ["serve", "auth-svc", "--port", "70000"],
    ["serve", "auth-svc", "--admin-port", "0"],
    ["up", "--otlp-port", "65536"],
    ["consul", "register", "auth-svc", "--port", "70000"],
])
def test_port_options_are_1_to_65535(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from aivo_mesh.cli import main

    # A config that does not exist: were the port accepted, the command would stop there, starting nothing.
    assert main([*argv, "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "is not in the range 1<=x<=65535" in capsys.readouterr().err


def test_every_port_option_takes_1_to_65535() -> None:
    import click

    from aivo_mesh.cli._root import PORT, cli

    def options(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Parameter]]:
        for param in cmd.params:
            yield path, param
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from options(sub, f"{path} {name}")

    ports = [(path, p) for path, p in options(cli, "meshctl") if (p.name or "").endswith("port")]
    assert len(ports) >= 6  # serve --port/--admin-port, up --otlp-port, collector, _supervise, consul
    assert [f"{path} --{p.name}" for path, p in ports if p.type is not PORT] == []


# --------------------------------------------------------------------------- meshctl up / demo preflight


@pytest.fixture
def prepared(tmp_path: Path) -> StateDir:
    """A state dir as `meshctl up --free-ports` prepares it: effective mesh.yaml and certificates."""
    state = StateDir(tmp_path / "state")
    prepare(state, str(ROOT / "mesh.yaml"), free_ports=True)
    return state


@pytest.fixture
def envoy_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar plan names an Envoy binary that preflight never runs: these tests need no Envoy."""
    monkeypatch.setattr(runtime_mesh, "envoy_binary", lambda: "/nonexistent/envoy")


@pytest.mark.usefixtures("envoy_named")
def test_preflight_passes_a_prepared_mesh(prepared: StateDir) -> None:
    mesh = load_mesh(prepared.mesh_file)
    for plane in ("proxyless", "sidecar"):
        preflight(prepared, mesh, *plan(prepared, mesh, plane, collector_port=free_port()))


def test_preflight_names_every_bad_key_and_port_in_use(prepared: StateDir) -> None:
    mesh = load_mesh(prepared.mesh_file)
    procs, info = plan(prepared, mesh, "proxyless", collector_port=free_port())
    learner_key = prepared.certs.identity_paths("learner-svc")[1]
    client_key = prepared.certs.identity_paths("mesh-client")[1]
    learner_key.chmod(0o644)
    client_key.write_text("not a key")
    events = mesh.service("event-collector-svc")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", events.port))
        taken.listen()
        with pytest.raises(StartupError) as info_:
            preflight(prepared, mesh, procs, info)
    lines = str(info_.value).splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"{learner_key}: private key is accessible by group/others (mode 0644)")
    assert lines[1].startswith(f"{client_key}: ")
    assert lines[2] == (f"port {events.port} in use: event-collector-svc cannot listen on 127.0.0.1:{events.port} "
                        "(another process has it)")


@pytest.mark.usefixtures("envoy_named")
def test_preflight_names_a_unix_socket_in_use(prepared: StateDir) -> None:
    mesh = load_mesh(prepared.mesh_file)
    procs, info = plan(prepared, mesh, "sidecar", collector_port=free_port())
    outbound = str(info.services["learner-svc"].outbound).removeprefix("unix:")
    with socket.socket(socket.AF_UNIX) as taken:
        taken.bind(outbound)
        taken.listen()
        with pytest.raises(StartupError) as info_:
            preflight(prepared, mesh, procs, info)
    assert str(info_.value) == (f"unix:{outbound} in use: learner-svc-envoy outbound cannot listen there "
                                "(another process has it)")


def test_up_with_a_0644_key_exits_2_before_starting_anything(prepared: StateDir) -> None:
    key = prepared.certs.identity_paths("auth-svc")[1]
    key.chmod(0o644)
    proc = meshctl("up", "--plane", "proxyless", "--free-ports", "--config", str(ROOT / "mesh.yaml"),
                   "--state-dir", str(prepared.root))
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert _error_lines(proc) == [f"error: {key}: private key is accessible by group/others (mode 0644); "
                                  f"run: chmod 600 {key}"]
    assert not prepared.log_file("supervisor").exists()  # the supervisor was never started
    assert prepared.read_processes() == []


async def test_an_admin_endpoint_beyond_loopback_is_a_warning(
        tmp_path: Path, mesh_certs: CertLayout, caplog: pytest.LogCaptureFixture) -> None:
    """METRICS_HOST (or observability.metrics.host) not loopback opens the unauthenticated admin endpoint to
    the network: allowed, as the rendered Compose and Linkerd files need it, but never silently."""
    from aivo_mesh.config import EnvSettings, apply_env
    from aivo_mesh.runtime.serve import ServeOptions, serve_service

    mesh = apply_env(load_mesh(ROOT / "mesh.yaml"), EnvSettings(metrics_host="0.0.0.0"))
    stop = asyncio.Event()
    stop.set()  # start, then stop at once
    await serve_service(mesh, "analytics-svc", mesh_certs, tmp_path / "data",
                        ServeOptions(port=free_port(), admin_port=free_port(), grace=0), stop=stop)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("admin endpoint listens on 0.0.0.0" in w and "unauthenticated" in w for w in warnings), warnings

    caplog.clear()
    await serve_service(load_mesh(ROOT / "mesh.yaml"), "analytics-svc", mesh_certs, tmp_path / "data",
                        ServeOptions(port=free_port(), admin_port=free_port(), grace=0), stop=stop)
    assert not [r for r in caplog.records if "admin endpoint listens on" in r.getMessage()]


@pytest.mark.parametrize(("argv", "fragment"), [
    (["traces", "--last", "-1"], "-1 is not in the range x>=1"),
    (["traces", "--width", "0"], "0 is not in the range x>=1"),
    (["serve", "auth-svc", "--grace", "-1"], "-1.0 is not in the range x>=0"),
    (["demo", "--duration", "-1"], "-1.0 is not in the range x>=0"),
    (["demo", "--workers", "0"], "0 is not in the range x>=1"),
    (["demo", "--timeout", "0"], "0.0 is not in the range x>0"),
    (["up", "--timeout", "-5"], "-5.0 is not in the range x>0"),
    (["status", "--interval", "-1"], "-1.0 is not in the range x>=0"),  # 0 is allowed: no rate sampling
])
def test_counts_and_durations_out_of_range_are_usage_errors(
        argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aivo_mesh.cli import main

    # --state-dir / --config that do not exist: were the value accepted, the command would stop there.
    extra = ["--config", str(tmp_path / "absent.yaml")] if argv[0] in ("serve", "demo", "up") else \
        ["--state-dir", str(tmp_path / "absent")]
    assert main([*argv, *extra]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["consul", "services", "--consul", "http://ops:s3cret@127.0.0.1:1"],
    ["consul", "register", "--config", str(ROOT / "mesh.yaml"), "--consul", "ops:s3cret@127.0.0.1:1"],
    # A config that does not exist: were the address accepted, serve would stop there.
    ["serve", "auth-svc", "--config", "absent.yaml", "--consul", "https://ops:s3cret@consul.internal:8501"],
])
def test_consul_credentials_in_the_address_are_refused_and_never_echoed(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from aivo_mesh.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "***@" in err
    assert "--token or $CONSUL_HTTP_TOKEN" in err


def test_consul_address_from_the_environment_is_redacted_too(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from aivo_mesh.cli import main

    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://ops:s3cret@127.0.0.1:1")
    assert main(["consul", "services"]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "http://***@127.0.0.1:1" in err
    # `serve --discovery consul` watches the same agent: refused the same way, before anything starts.
    assert main(["serve", "auth-svc", "--config", str(ROOT / "mesh.yaml"), "--data-dir", str(tmp_path / "data"),
                 "--discovery", "consul"]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "http://***@127.0.0.1:1" in err


@pytest.mark.parametrize(("options", "fragment"), [
    (["--dns-server", "dns.internal"], "expected IP, IP:PORT or [IPv6]:PORT"),
    (["--dns-server", "10.0.0.2:99999"], "expected IP, IP:PORT or [IPv6]:PORT"),
    (["--dns-template", "{service}.internal:{port}"], "fields are {name} {host} {port} {namespace}"),
])
def test_bad_dns_discovery_options_are_usage_errors_before_anything_starts(
        options: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aivo_mesh.cli import main

    argv = ["serve", "auth-svc", "--config", str(ROOT / "mesh.yaml"), "--data-dir", str(tmp_path / "data"),
            "--certs", str(tmp_path / "absent-certs"), "--discovery", "dns", *options]
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
