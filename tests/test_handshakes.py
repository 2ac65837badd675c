"""Refused TLS handshakes on the proxyless plane: grpc core's stderr lines become JSON log records and
mtls_refused_connections_total increments (runtime.handshakes), with real TLS on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from helpers import can_batch, checkout_env
from prometheus_client.parser import text_string_to_metric_families
from waiting import until

from aivo_mesh.config import MeshSpec
from aivo_mesh.pki import CertLayout
from aivo_mesh.pki.crypto import DEFAULT_KEY_TYPE, cert_pem, generate_key, key_pem
from aivo_mesh.pki.issue import build_leaf, init_ca, issue_leaf, load_issuer
from aivo_mesh.runtime.handshakes import REASONS, CoreLogFilter, HandshakeCapture, classify
from aivo_mesh.runtime.local import free_port
from aivo_mesh.runtime.supervisor import meshctl_argv

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# What grpcio 1.85.3 printed (GRPC_TRACE=handshaker) for a server refusing an expired client certificate.
EXPIRED = textwrap.dedent("""\
    I1206 01:46:19.552483    9846 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: \
error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired
    I1206 01:46:19.552518    9846 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake failed \
(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: \
certificate has expired: OK
    === Source Location Trace: ===\x20
    src/core/util/status_helper.cc:68
     shutdown=false index=2, args={endpoint=0x7fc150019c70, args={grpc.experimental.event_engine=0x56017f734bb0, \
grpc.internal.endpoint_local_address=ipv4:127.0.0.1:46663, grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:60580, \
grpc.internal.security_connector=0x56017f735dd0, grpc.internal.server_credentials=0x56017f336fb0}}
    I1206 01:46:19.552528    9846 channel_trace.h:396] handshake manager 0x7fc150019f80: Failed with error: UNKNOWN: \
Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:\
CERTIFICATE_VERIFY_FAILED: certificate has expired: OK
    === Source Location Trace: ===\x20
    src/core/util/status_helper.cc:68

    """)
# This process's own outbound handshake refusing a server that names another service.
CLIENT_SIDE = textwrap.dedent("""\
    E1206 01:46:20.896944    9871 ssl_transport_security.cc:3238] No match found for server name: learner-svc
    I1206 01:46:20.897726    9870 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Custom verification \
check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.
    === Source Location Trace: ===
    src/core/util/status_helper.cc:68
     shutdown=false index=4, args={endpoint=0x7fdb50004f20, args={grpc.default_authority=learner-svc, \
grpc.internal.channel_credentials=0x55f669428ba0, grpc.internal.endpoint_local_address=ipv4:127.0.0.1:34832, \
grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:40951}}
    """)
TRACE_NOISE = ("I1206 01:46:25.668679    7633 handshaker.cc:80] handshake_manager 0x7f950001b4f0: adding handshaker "
               "security [0x7f950000ca90] at index 3\n")


def _filter(text: str) -> tuple[str, list[Any]]:
    f = CoreLogFilter()
    out, events = [], []
    for line in text.splitlines(keepends=True):
        keep, evs = f.feed(line.encode())
        if keep:
            out.append(line)
        events.extend(evs)
    events.extend(f.flush())
    return "".join(out), events


def test_a_server_refusal_becomes_one_event_with_reason_side_and_both_addresses() -> None:
    out, events = _filter(TRACE_NOISE + EXPIRED)
    assert out == ""
    [ev] = events
    assert (ev.reason, ev.side, ev.peer, ev.local, ev.local_port) == (
        "certificate_expired", "server", "127.0.0.1:60580", "127.0.0.1:46663", 46663)
    assert ev.detail.endswith("CERTIFICATE_VERIFY_FAILED: certificate has expired")


def test_other_lines_pass_through_unchanged_around_consumed_records() -> None:
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nValueError: boom\n"
    text = '{"level":"INFO","msg":"hello"}\n' + EXPIRED + traceback + CLIENT_SIDE + "\n" + "plain tail\n"
    out, events = _filter(text)
    assert out == ('{"level":"INFO","msg":"hello"}\n' + traceback
                   + "E1206 01:46:20.896944    9871 ssl_transport_security.cc:3238] No match found for server name: "
                     "learner-svc\n" + "plain tail\n")
    assert [(e.side, e.reason, e.peer) for e in events] == [
        ("server", "certificate_expired", "127.0.0.1:60580"),
        ("client", "certificate_verify_failed", "127.0.0.1:40951")]


@pytest.mark.parametrize(("error", "reason"), [
    ("SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid "
     "certificate verification context", "no_client_certificate"),
    ("CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate", "unknown_ca"),
    ("CERTIFICATE_VERIFY_FAILED: self signed certificate", "unknown_ca"),
    ("CERTIFICATE_VERIFY_FAILED: certificate has expired", "certificate_expired"),
    ("CERTIFICATE_VERIFY_FAILED: certificate is not yet valid", "certificate_verify_failed"),
    ("error:1000042e:SSL routines:OPENSSL_internal:TLSV1_ALERT_PROTOCOL_VERSION", "tls_version"),
    ("error:100000f0:SSL routines:OPENSSL_internal:UNSUPPORTED_PROTOCOL", "tls_version"),
    ("error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER", "not_tls"),
    ("error:1000009c:SSL routines:OPENSSL_internal:HTTP_REQUEST", "not_tls"),
    ("Handshake read failed (Socket closed)", "closed_during_handshake"),
    ("error:100000f3:SSL routines:OPENSSL_internal:WRONG_CURVE", "handshake_error"),
])
def test_core_error_texts_map_to_a_small_set_of_reasons(error: str, reason: str) -> None:
    assert classify(error) == reason in REASONS


def test_the_capture_refuses_to_start_when_grpc_was_imported_without_its_tracer(monkeypatch) -> None:
    assert "grpc" in sys.modules
    monkeypatch.delenv("GRPC_TRACE", raising=False)
    capture = HandshakeCapture().start()
    assert not capture.active
    assert "GRPC_TRACE=handshaker" in capture.problem
    monkeypatch.setenv("GRPC_VERBOSITY", "ERROR")
    assert "GRPC_VERBOSITY=ERROR hides" in HandshakeCapture().start().problem


# -- the relay: nothing lost, nothing reordered, also when the process dies without cleaning up -----

RELAY_SCRIPT = """
import os, sys, threading
from aivo_mesh.runtime.handshakes import capture_handshakes
capture = capture_handshakes()
assert capture.active, capture.problem
assert os.environ["GRPC_TRACE"] == "handshaker"
from aivo_mesh.telemetry.logs import configure_logging
configure_logging("INFO")
record = sys.argv[1].encode()

def writer(n):
    for i in range(2000):
        os.write(2, b"w%d line %05d %s\\n" % (n, i, b"x" * 300))  # as core's threads do: fd 2, no GIL
        if i == 1000 and n == 0:
            os.write(2, record)

threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
for t in threads: t.start()
for t in threads: t.join()
os.write(2, record.replace(b"127.0.0.1:60580", b"127.0.0.1:60581"))
print("partial line without newline", file=sys.stderr, end="", flush=True)
os._exit(0)  # no atexit, no flush: the relay must still let everything out, and log the last event itself
"""


def test_relay_lets_every_other_byte_out_in_order_even_when_the_process_exits_hard() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_TRACE", "GRPC_VERBOSITY")}
    env["PYTHONPATH"] = str(SRC)
    # stderr is a pipe read to EOF: that comes once the relay, which outlives the process, has let all out.
    proc = subprocess.run([sys.executable, "-c", RELAY_SCRIPT, EXPIRED], stderr=subprocess.PIPE, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stderr.decode()
    lines = text.splitlines()
    for n in range(3):
        mine = [line for line in lines if line.startswith(f"w{n} ")]
        assert mine == [f"w{n} line {i:05d} {'x' * 300}" for i in range(2000)]
    assert "partial line without newline" in text
    assert "handshaker.cc" not in text and "Handshake failed" not in text and "gRPC Tracers" not in text
    records = [json.loads(line) for line in lines if line.startswith("{") and "tls_refused" in line]
    # The first logged by the process; the last one the process died before logging, by the relay.
    assert sorted(r["peer"] for r in records) == ["127.0.0.1:60580", "127.0.0.1:60581"]
    assert {(r["reason"], r["logger"], r["level"], r["side"]) for r in records} == {
        ("certificate_expired", "aivo_mesh.tls", "WARNING", "server")}


# -- end to end: `meshctl serve` refusing real clients ---------------------------------------------

def _expired_identity(certs: CertLayout, mesh: MeshSpec, out: Path) -> tuple[Path, Path]:
    """A mesh-client leaf from the mesh's own issuing CA that expired yesterday."""
    issuer = load_issuer(certs)
    key = generate_key(DEFAULT_KEY_TYPE)
    leaf = build_leaf(issuer, mesh, "mesh-client", key, 1, datetime.now(UTC) - timedelta(days=2))
    cert, key_file = out / "expired.crt", out / "expired.key"
    cert.write_bytes(cert_pem(leaf) + cert_pem(issuer.cert))
    key_file.write_bytes(key_pem(key))
    return cert, key_file


def _tls_client(port: int, ca: Path, cert: Path | None, key: Path | None, *, tls12: bool = False,
                calls: int = 1) -> tuple[int, list[str]]:
    """Connect, handshake, make `calls` gRPC Health/Check calls over HTTP/2; (local port, grpc-status of
    each call, or the error that ended the connection)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(ca)
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    results: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        local = int(raw.getsockname()[1])
        try:
            with ctx.wrap_socket(raw, server_hostname="auth-svc") as tls:
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                for _ in range(calls):
                    sid = conn.get_next_available_stream_id()
                    conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":authority", "auth-svc"),
                                            (":path", "/grpc.health.v1.Health/Check"),
                                            ("content-type", "application/grpc"), ("te", "trailers")])
                    conn.send_data(sid, b"\x00\x00\x00\x00\x00", end_stream=True)
                    tls.sendall(conn.data_to_send())
                    status = ""
                    while not status:
                        data = tls.recv(65535)
                        if not data:
                            return local, [*results, "closed"]
                        for ev in conn.receive_data(data):
                            if isinstance(ev, h2.events.TrailersReceived | h2.events.ResponseReceived):
                                status = dict(ev.headers).get(b"grpc-status", b"").decode() or status
                        tls.sendall(conn.data_to_send())
                    results.append(status)
        except (ssl.SSLError, OSError) as exc:
            results.append(type(exc).__name__)
    return local, results


def _refusals(admin_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "mtls_refused_connections" for s in f.samples if s.name.endswith("_total")}


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.mark.slow
async def test_meshctl_serve_logs_and_counts_each_refused_client(mesh: MeshSpec, mesh_certs: CertLayout,
                                                                 tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    err = tmp_path / "serve.stderr"
    env = checkout_env(["GRPC_TRACE", "GRPC_VERBOSITY"])
    with err.open("wb") as f:
        proc = subprocess.Popen(
            meshctl_argv("serve", "auth-svc", "--config", str(ROOT / "mesh.yaml"), "--certs", str(mesh_certs.root),
                         "--port", str(port), "--admin-port", str(admin), "--data-dir", str(tmp_path / "data")),
            stderr=f, stdout=subprocess.DEVNULL, env=env, cwd=tmp_path)
    try:
        await until(lambda: _ready(admin) or proc.poll() is not None, timeout=30, what="meshctl serve ready")
        assert proc.poll() is None, err.read_text()
        foreign = CertLayout(tmp_path / "foreign")
        init_ca(foreign, mesh.mesh.trust_domain)  # same trust domain, another CA
        issue_leaf(foreign, "mesh-client", mesh)
        ca = mesh_certs.ca_cert
        good_cert, good_key = mesh_certs.identity_paths("mesh-client")
        peers = {
            "unknown_ca": _tls_client(port, ca, *foreign.identity_paths("mesh-client")),
            "certificate_expired": _tls_client(port, ca, *_expired_identity(mesh_certs, mesh, tmp_path)),
            "no_client_certificate": _tls_client(port, ca, None, None),
            # aivo_mesh.tls leaves TLS 1.2 no cipher suite: refused in the handshake (the client's alert).
            "tls_version": _tls_client(port, ca, good_cert, good_key, tls12=True, calls=2),
        }
        assert peers["tls_version"][1] in (["SSLError"], ["SSLEOFError"]), peers
        # The others never get to make a call: the server closes the connection (the client reads EOF).
        assert all(outcome[1] == ["closed"] for r, outcome in peers.items() if r != "tls_version"), peers
        expected = {r: 1.0 if r in peers else 0.0 for r in REASONS}
        await until(lambda: _refusals(admin) == expected, timeout=10, what=f"refusal counters {expected}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    text = err.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    refused = {r["reason"]: r for r in records if r.get("event") == "tls_refused"}
    assert set(refused) == set(peers), text
    for reason, (local_port, _) in peers.items():
        r = refused[reason]
        assert (r["peer"], r["service"], r["level"], r["logger"]) == (
            f"127.0.0.1:{local_port}", "auth-svc", "WARNING", "aivo_mesh.tls"), r
        assert r["local"] == f"127.0.0.1:{port}"
    assert "certificate has expired" in refused["certificate_expired"]["detail"]
    assert "NO_SHARED_CIPHER" in refused["tls_version"]["detail"]
    # Nothing of grpc core's handshake chatter is left as raw text; the rest of the log is intact.
    assert "Handshake failed" not in text and "handshaker.cc" not in text
    serving = [r["msg"] for r in records if r.get("msg", "").startswith("auth-svc serving on")]
    # `meshctl serve` runs on `aivo_mesh.run`: uvloop, and SCHED_BATCH where the system allows it.
    policy = "batch" if can_batch() else "normal"
    assert len(serving) == 1 and serving[0].endswith(f"loop, {policy} scheduling)"), serving
    assert all(line.startswith("{") for line in text.splitlines() if line.strip()), text


# -- the library opt-in without the capture: TLS 1.2 refusals still reach on_refused ----------------

_GRPC_FIRST = """
import asyncio, grpc, json, sys   # grpc before aivo_mesh: TLS 1.2 gets through the handshake (aivo_mesh.tls)
sys.path.insert(0, {tests!r})
from aivo_mesh import MeshServer
from aivo_mesh.config import load_mesh
from aivo_mesh.pki import CertLayout
from aivo_mesh.runtime.handshakes import RefusalLog
from aivo_mesh.telemetry.metrics import MeshMetrics
from test_handshakes import _tls_client

async def main():
    certs, metrics = CertLayout({certs!r}), MeshMetrics()
    server = MeshServer.for_service(load_mesh({mesh!r}), "auth-svc", certs, port=0, host="127.0.0.1",
                                    on_refused=RefusalLog("auth-svc", metrics))
    port = await server.start()
    cert, key = certs.identity_paths("mesh-client")
    local, statuses = await asyncio.to_thread(_tls_client, port, certs.ca_cert, cert, key, tls12=True, calls=3)
    await server.stop(0.5)
    def count(reason):
        labels = {{"service": "auth-svc", "reason": reason}}
        return metrics.registry.get_sample_value("mtls_refused_connections_total", labels)
    print(json.dumps({{"local": local, "statuses": statuses,
                      "tls_version": count("tls_version"), "unknown_ca": count("unknown_ca")}}))
asyncio.run(main())
"""


def test_meshserver_on_refused_reports_tls12_connections_once_each(mesh_certs: CertLayout) -> None:
    # Only reachable when the handshake refusal could not apply (grpc imported first): each call is refused
    # UNAUTHENTICATED, and the connection is reported once.
    script = _GRPC_FIRST.format(tests=str(ROOT / "tests"), certs=str(mesh_certs.root), mesh=str(ROOT / "mesh.yaml"))
    env = checkout_env(["GRPC_SSL_CIPHER_SUITES", "GRPC_TRACE"])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [str(grpc.StatusCode.UNAUTHENTICATED.value[0])] * 3
    assert (result["tls_version"], result["unknown_ca"]) == (1.0, 0.0)
    assert "TLS 1.2 peers are not refused at the handshake" in out.stderr  # and the process said why
async def _in_thread(fn, *args, **kwargs):
    import asyncio

    return await asyncio.to_thread(fn, *args, **kwargs)
