"""Refused TLS handshakes of the proxyless plane, from grpc core's stderr to JSON logs and a metric.

grpc Python has no handshake callback: a MeshServer refuses a client from a foreign CA, with an expired
certificate or with none by closing the connection, and the caller only sees UNAVAILABLE "Socket closed".
grpc core (grpcio 1.85) tells why on stderr only, one non-JSON line without the peer's address:

    I1206 01:46:19.552483    9846 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL:
      error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired

and its `handshaker` tracer (GRPC_TRACE=handshaker) adds, from the same thread, a record that names the
side (server or client credentials), both addresses and the error:

    I1206 ... handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake failed
      (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...CERTIFICATE_VERIFY_FAILED: certificate has expired: OK
    === Source Location Trace: ===
    src/core/util/status_helper.cc:68
     shutdown=false index=2, args={..., grpc.internal.endpoint_local_address=ipv4:127.0.0.1:50051,
      grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:60580, ..., grpc.internal.server_credentials=0x..}

Usage (what `meshctl serve` does):

    capture = capture_handshakes()     # FIRST, before grpc is imported: it turns the tracer on
    ...
    server = MeshServer(..., on_refused=RefusalLog("auth-svc", metrics))

`capture_handshakes()` points file descriptor 2 at a pipe read by a small relay process
(`python -S -E`, stdlib only). The relay writes every byte that is not a grpc-core handshake line to
the original stderr, unchanged and in order, and turns handshake failures into events sent back to
this process, where a thread hands them to the MeshServer listening on that local port
(`on_refused`): one JSON log record and one `mtls_refused_connections_total{service,reason}`
increment each. Failures no server claims (this process's own outbound handshakes, servers without
`on_refused`) are logged by this module as JSON records, and the tracer's other lines are dropped.

Why a process and not a thread: grpc core writes to fd 2 from its own threads, without the GIL;
a relay in another process never needs this process's GIL to drain the pipe (no deadlock while a
core thread waits on a full pipe), and it still drains to EOF after this process aborts (a grpc
core `F` line before abort() is not lost). It ignores SIGINT/SIGTERM and exits at EOF, i.e. when
every writer of the pipe is gone. If it cannot hand an event back it writes it itself as a JSON line.

Limits: GRPC_VERBOSITY=ERROR or NONE hides these lines (nothing to capture); grpc reads GRPC_TRACE
when it is imported, so a process that imported grpc first must export GRPC_TRACE=handshaker itself.
TLS 1.2 is the exception: grpcio cannot refuse it at the handshake, so the handshake succeeds and
MeshServer refuses each call with UNAUTHENTICATED; with `on_refused` that is reported here too, once
per connection, with reason `tls_version` and the peer from grpc's context.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from aivo_mesh.telemetry.metrics import MeshMetrics

__all__ = [
    "REASONS",
    "CoreLogFilter",
    "Handshake",
    "HandshakeCapture",
    "PeerOnce",
    "RefusalListener",
    "RefusalLog",
    "capture_handshakes",
    "classify",
    "current_capture",
    "log_handshake",
    "peer_address",
    "relay",
]

log = logging.getLogger("aivo_mesh.tls")

# The reasons of mtls_refused_connections_total (a bounded label set: anything else is handshake_error).
REASONS = ("no_client_certificate", "unknown_ca", "certificate_expired", "certificate_verify_failed",
           "tls_version", "not_tls", "closed_during_handshake", "handshake_error")

# (reason, pattern of grpc core's / BoringSSL's error text), first match wins.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((r, re.compile(p)) for r, p in (
    ("no_client_certificate", r"PEER_DID_NOT_RETURN_A_CERTIFICATE|NO_CERTIFICATE_RETURNED|CERTIFICATE_REQUIRED"),
    ("certificate_expired", r"certificate has expired|CERTIFICATE_EXPIRED"),
    ("unknown_ca", r"unable to get (local )?issuer certificate|self[- ]signed certificate|UNKNOWN_CA"),
    ("certificate_verify_failed", r"CERTIFICATE_VERIFY_FAILED|BAD_CERTIFICATE|Custom verification check failed"
                                  r"|CERTIFICATE_UNKNOWN|UNSUPPORTED_CERTIFICATE"),
    # NO_SHARED_CIPHER: aivo_mesh.tls leaves TLS 1.2 only a PSK suite no peer has, so a client that cannot
    # speak TLS 1.3 finds no cipher in common.
    ("tls_version", r"UNSUPPORTED_PROTOCOL|PROTOCOL_VERSION|NO_SUPPORTED_VERSIONS|UNSUPPORTED_VERSION"
                    r"|NO_SHARED_CIPHER"),
    ("not_tls", r"WRONG_VERSION_NUMBER|HTTP_REQUEST|HTTPS_PROXY_REQUEST"),
    ("closed_during_handshake", r"Socket closed|Handshake read failed|Connection reset|Broken pipe|EOF"),
))


def classify(error: str) -> str:
    """The reason (one of REASONS) of a handshake error text as grpc core prints it."""
    return next((reason for reason, pattern in _RULES if pattern.search(error)), "handshake_error")


@dataclass(frozen=True, slots=True)
class Handshake:
    """One failed handshake (or a connection refused for its TLS version).

    side: "server" (this process refused a client) or "client" (its own outbound handshake failed).
    peer / local: "host:port" as grpc saw them, or "" when unknown."""

    reason: str
    side: str
    peer: str
    local: str
    detail: str

    @property
    def local_port(self) -> int | None:
        port = self.local.rpartition(":")[2]
        return int(port) if port.isdigit() else None


def _address(value: str) -> str:
    """'ipv4:127.0.0.1:5' -> '127.0.0.1:5'; 'ipv6:[::1]:5' -> '[::1]:5' (percent-decoded)."""
    for prefix in ("ipv4:", "ipv6:"):
        if value.startswith(prefix):
            return value[len(prefix):].replace("%5B", "[").replace("%5D", "]").replace("%25", "%")
    return value


# -- parsing grpc core's stderr ---------------------------------------------------------------------

_PREFIX = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (?P<file>[\w.+-]+):\d+\] (?P<msg>.*)$", re.DOTALL)
# Lines that continue a multi-line core record (a status's source locations, then the handshake args).
_CONTINUATION = re.compile(rb"^(=== Source Location Trace: === ?|\S+\.(cc|h):\d+| shutdown=.*|)$", re.DOTALL)
_FAILED = b"CallNextHandshakerLocked: error="
_ARG = r"grpc\.internal\.endpoint_{}_address=([^,}}\s]+)"
_PEER_RE = re.compile(_ARG.format("peer"))
_LOCAL_RE = re.compile(_ARG.format("local"))


class CoreLogFilter:
    """Splits grpc core's stderr lines: `feed(line)` -> (pass the line through?, finished events).

    Consumed: the `handshaker` tracer's records (a failure becomes a Handshake) and the ssl
    "Handshake failed with error" line that precedes each failure record. Everything else passes.
    Call `flush()` when the stream goes idle or ends, to finish a record still open."""

    def __init__(self) -> None:
        self._state: str | None = None  # "trace": inside a consumed record; "failure": one awaiting its args
        self._error = ""

    @property
    def busy(self) -> bool:
        return self._state == "failure"

    def feed(self, line: bytes) -> tuple[bool, list[Handshake]]:
        line = line.rstrip(b"\r\n")
        events: list[Handshake] = []
        m = _PREFIX.match(line)
        if m is None:
            if self._state is not None and _CONTINUATION.match(line):
                if self._state == "failure" and b"args={" in line:
                    events.append(self._event(line.decode("utf-8", "replace")))
                    self._state = "trace"
                return False, events
            events.extend(self.flush())
            return True, events
        events.extend(self.flush())
        file, msg = m.group("file"), m.group("msg")
        if file == b"handshaker.cc":
            if msg.startswith(_FAILED) and not msg.startswith(_FAILED + b"OK "):
                text = msg[len(_FAILED):].decode("utf-8", "replace")
                error, sep, args = text.partition(" shutdown=")
                self._error = error.removesuffix(": OK").strip()
                self._state = "failure"
                if sep and "args={" in args:
                    events.append(self._event(args))
                    self._state = "trace"
            else:
                self._state = "trace"
            return False, events
        if file == b"channel_trace.h" and msg.startswith(b"handshake manager "):
            self._state = "trace"
            return False, events
        if file == b"trace.cc" and msg == b"gRPC Tracers: handshaker":
            return False, events  # said once at start when the tracer is on (GRPC_TRACE=handshaker)
        if file == b"ssl_transport_security.cc" and msg.startswith(b"Handshake failed with error"):
            return False, events  # the failure record that follows says the same, with side and addresses
        return True, events

    def flush(self) -> list[Handshake]:
        """End the open record; a failure whose args never came is reported without addresses."""
        pending = self._state == "failure"
        self._state = None
        return [self._event("")] if pending else []

    def _event(self, args: str) -> Handshake:
        side = ("server" if "grpc.internal.server_credentials=" in args
                else "client" if "grpc.internal.channel_credentials=" in args else "unknown")
        peer, local = _PEER_RE.search(args), _LOCAL_RE.search(args)
        detail = re.sub(r"^[A-Z_]+: ", "", self._error)  # the status code name adds nothing
        return Handshake(classify(self._error), side, _address(peer.group(1)) if peer else "",
                         _address(local.group(1)) if local else "", detail)


# -- the relay process ------------------------------------------------------------------------------

IDLE_SECONDS = 0.2  # a partial line or an open record is let out after this long without input
MAX_PENDING_EVENTS = 4 * 1024 * 1024  # bytes of events awaiting the parent; past it they go to stderr


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:
            return  # the real stderr is gone: nothing else to do with the bytes


def _json_line(event: Handshake) -> bytes:
    """The event as the JSON log line this module would have logged (when the parent cannot)."""
    doc = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": "WARNING",
           "logger": log.name, "msg": _message(event), "event": _event_name(event), **asdict(event)}
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


# In-band messages from this process to the relay, on the stderr pipe itself (so they arrive after
# whatever was written before them): "I have logged event N", and "I am closing normally".
ACK = b"\x00aivo-mesh-handshakes ack "
CLOSING = b"\x00aivo-mesh-handshakes closing\x00"
MAX_UNACKED = 10_000


def relay(data_fd: int, events_fd: int, out_fd: int = 2) -> None:
    """The relay process's loop: `data_fd` (the pipe behind the parent's fd 2) -> `out_fd` (the real
    stderr), events -> `events_fd` as JSON lines. Returns at EOF on `data_fd`.

    An event is the parent's to log once it acknowledges it; events still unacknowledged at EOF
    without the parent's "closing" (it died: abort, kill, os._exit) are written here as JSON lines."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a Ctrl-C to the process group must not cut the parent's stderr
    os.set_blocking(events_fd, False)
    core = CoreLogFilter()
    partial = b""
    pending = bytearray()  # events not yet written to the parent
    unacked: dict[int, Handshake] = {}  # written, not yet logged by the parent
    seq = 0
    parent_gone = closing = False
    poller = select.poll()
    poller.register(data_fd, select.POLLIN)
    line_start = True  # whether out_fd's last byte ended a line

    def out(data: bytes) -> None:
        nonlocal line_start
        if data:
            _write_all(out_fd, data)
            line_start = data.endswith(b"\n")

    def log_here(ev: Handshake) -> None:
        out((b"" if line_start else b"\n") + _json_line(ev))

    def add(events: Iterable[Handshake]) -> None:
        nonlocal seq
        for ev in events:
            seq += 1
            line = json.dumps({"seq": seq, **asdict(ev)}, separators=(",", ":")).encode() + b"\n"
            if parent_gone or len(pending) + len(line) > MAX_PENDING_EVENTS:
                log_here(ev)
                continue
            pending.extend(line)
            unacked[seq] = ev
            if len(unacked) > MAX_UNACKED:  # a parent that never acknowledges: stop remembering
                del unacked[next(iter(unacked))]

    def send() -> None:
        nonlocal parent_gone
        while pending and not parent_gone:
            try:
                del pending[:os.write(events_fd, pending)]
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:  # the parent stopped reading: what it has not logged, log here
                parent_gone = True
                pending.clear()
                for ev in unacked.values():
                    log_here(ev)
                unacked.clear()

    def control(line: bytes) -> bytes:
        """Act on an in-band message ending `line`; return what precedes it (another writer's partial line)."""
        nonlocal closing
        if line.endswith(CLOSING):
            closing = True
            return line[:-len(CLOSING)]
        head, _, tail = line.rpartition(ACK)
        if tail.endswith(b"\x00") and tail[:-1].isdigit():
            unacked.pop(int(tail[:-1]), None)
            return head
        return line

    while True:
        if pending:
            poller.register(events_fd, select.POLLOUT)
        else:
            with contextlib.suppress(KeyError):
                poller.unregister(events_fd)
        waiting = partial or core.busy
        try:
            ready = dict(poller.poll(IDLE_SECONDS * 1000 if waiting else None))
        except InterruptedError:
            continue
        if ready.get(events_fd, 0) & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            send()
        if not ready.get(data_fd):
            if not ready and waiting:  # idle: let a partial line out, end an open record
                out(partial)
                partial = b""
                add(core.flush())
            continue
        chunk = os.read(data_fd, 1 << 16)
        if not chunk:
            break
        lines = (partial + chunk).split(b"\n")
        partial = lines.pop()
        passed = bytearray()
        for line in lines:
            if b"\x00aivo-mesh-handshakes " in line:
                rest = control(line)
                if rest:
                    partial = rest + partial  # another writer's unfinished line, interrupted by ours
                continue
            keep, events = core.feed(line)
            if keep:
                passed += line + b"\n"
            add(events)
        out(bytes(passed))
        send()
    # EOF: every writer is gone. Let the rest out, then hand the last events over or log them here.
    if partial:
        keep, events = core.feed(partial)
        if keep:
            out(partial)
        add(events)
    add(core.flush())
    if closing:  # the parent reads until this process exits
        os.set_blocking(events_fd, True)
        send()
    else:
        for ev in unacked.values():
            log_here(ev)


# -- this process's side ----------------------------------------------------------------------------

class RefusalListener(Protocol):
    def __call__(self, handshake: Handshake) -> None: ...


def _event_name(h: Handshake) -> str:
    return "tls_refused" if h.side == "server" else "tls_handshake_failed"


def _message(h: Handshake) -> str:
    if h.side == "server":
        return f"TLS connection from {h.peer or 'an unknown peer'} refused: {h.reason} ({h.detail})"
    return f"TLS handshake with {h.peer or 'an unknown peer'} failed ({h.side} side): {h.reason} ({h.detail})"


def _level(h: Handshake) -> int:
    # A bare TCP connect and close (a port probe) ends the same way as a client that refused our
    # certificate without saying so: worth a line, not a warning.
    return logging.INFO if h.reason == "closed_during_handshake" else logging.WARNING


def log_handshake(h: Handshake, logger: logging.Logger = log, service: str = "") -> None:
    """One JSON log record for `h` (event tls_refused on the server side, else tls_handshake_failed)."""
    extra = {"event": _event_name(h), "side": h.side, "reason": h.reason, "peer": h.peer, "local": h.local,
             "detail": h.detail}
    if service:
        extra["service"] = service
    logger.log(_level(h), _message(h), extra=extra)


class RefusalLog:
    """A MeshServer's `on_refused`: a JSON log record per refusal and, with `metrics`, an increment of
    mtls_refused_connections_total{service,reason} (every reason is published at 0 from the start)."""

    def __init__(self, service: str, metrics: MeshMetrics | None = None, logger: logging.Logger | None = None) -> None:
        self.service = service
        self.metrics = metrics
        self.logger = logger or log
        if metrics is not None:
            metrics.declare_tls_refusals(service)

    def __call__(self, handshake: Handshake) -> None:
        log_handshake(handshake, self.logger, self.service)
        if self.metrics is not None:
            self.metrics.observe_tls_refusal(self.service, handshake.reason)


class HandshakeCapture:
    """This process's stderr, relayed (see the module docstring). `active` is False, and `problem` says
    why, when grpc core's handshake lines cannot be seen; the process's stderr is then left alone."""

    def __init__(self) -> None:
        self.active = False
        self.problem = ""
        self.events = 0  # events received from the relay
        self._subscribers: list[tuple[int | None, RefusalListener]] = []
        self._lock = threading.Lock()
        self._saved_fd: int | None = None
        self._events_fd: int | None = None
        self._relay: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._fd_lock = threading.Lock()  # fd 2 is the pipe while not _closing

    # -- who hears of refusals ---------------------------------------------------------------------
    def subscribe(self, listener: RefusalListener, port: int | None = None) -> None:
        """Hand `listener` the server-side failures on local `port` (None: on any port)."""
        with self._lock:
            self._subscribers.append((port, listener))

    def unsubscribe(self, listener: RefusalListener) -> None:
        with self._lock:
            self._subscribers = [(p, s) for p, s in self._subscribers if s is not listener]

    def dispatch(self, h: Handshake) -> None:
        """Route one event: to the subscribers of its local port (server side), else to the log."""
        with self._lock:
            targets = [s for p, s in self._subscribers if h.side == "server" and p in (None, h.local_port)]
        for listener in targets:
            try:
                listener(h)
            except Exception:
                log.exception("handshake listener %r failed", listener)
        if not targets:
            log_handshake(h)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> HandshakeCapture:
        if self.active or self._closing:
            return self
        self.problem = _visibility_problem()
        if self.problem:
            return self
        if "grpc" not in sys.modules:
            traces = [t for t in os.environ.get("GRPC_TRACE", "").split(",") if t.strip()]
            os.environ["GRPC_TRACE"] = ",".join([*traces, "handshaker"])
        data_r, data_w = os.pipe()
        events_r, events_w = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # Linux: room for bursts (default 64 KiB)
            import fcntl

            fcntl.fcntl(data_w, fcntl.F_SETPIPE_SZ, 1 << 20)
        src = str(Path(__file__).resolve().parents[2])  # the directory holding the aivo_mesh package
        try:
            self._relay = subprocess.Popen(
                [sys.executable, "-E", "-S", "-c",
                 "import sys; sys.path.insert(0, sys.argv[1]); from aivo_mesh.runtime.handshakes import relay; "
                 "relay(int(sys.argv[2]), int(sys.argv[3]))", src, str(data_r), str(events_w)],
                pass_fds=(data_r, events_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError as exc:
            for fd in (data_r, data_w, events_r, events_w):
                os.close(fd)
            self.problem = f"cannot start the stderr relay: {exc}"
            return self
        os.close(data_r)
        os.close(events_w)
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        self._saved_fd = os.dup(2)
        os.set_inheritable(self._saved_fd, False)
        os.dup2(data_w, 2)
        os.close(data_w)
        self._events_fd = events_r
        self._thread = threading.Thread(target=self._read_events, name="aivo-mesh-handshakes", daemon=True)
        self._thread.start()
        self.active = True
        atexit.register(self.close)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Give fd 2 back to the original stderr, then wait (bounded) for the relay to let out what it
        holds and hand over its last events. A relay still fed by a child process keeps relaying."""
        if not self.active or self._closing:
            return
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        with self._fd_lock:
            self._closing = True
            with contextlib.suppress(OSError):
                os.write(2, CLOSING + b"\n")
            self._restore()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._relay is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._relay.wait(max(0.0, timeout / 5))
        self.active = False
        atexit.unregister(self.close)

    def _restore(self) -> None:
        saved, self._saved_fd = self._saved_fd, None
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)

    def _read_events(self) -> None:
        assert self._events_fd is not None
        with os.fdopen(self._events_fd, "rb", buffering=0) as raw:
            buf = b""
            while chunk := raw.read(1 << 16):
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    try:
                        doc = json.loads(line)
                        seq = int(doc.pop("seq"))
                        h = Handshake(**doc)
                    except (ValueError, TypeError, KeyError):
                        continue
                    self.events += 1
                    self.dispatch(h)
                    with self._fd_lock, contextlib.suppress(OSError):
                        if not self._closing:  # after the log record, on the same pipe: the relay may forget it
                            os.write(2, ACK + str(seq).encode() + b"\x00\n")
        with self._fd_lock:
            if self._closing:
                return
            self._closing = True  # the relay died under us: stderr must not stay a pipe nobody reads
            self._restore()
            self.active = False
        atexit.unregister(self.close)
        log.warning("the stderr relay of handshake logging exited; grpc core's handshake lines are no longer "
                    "captured")


def _visibility_problem() -> str:
    if os.name != "posix":
        return "handshake capture needs a POSIX system"
    verbosity = os.environ.get("GRPC_VERBOSITY", "").strip().upper()
    if verbosity in ("ERROR", "NONE"):
        return (f"GRPC_VERBOSITY={verbosity} hides grpc core's handshake lines: refused TLS handshakes are not "
                "logged nor counted (unset it, or set WARNING or INFO)")
    traces = {t.strip().lower() for t in os.environ.get("GRPC_TRACE", "").split(",")}
    if "grpc" in sys.modules and not traces & {"handshaker", "all"}:
        return ("grpc was imported before capture_handshakes(), so its handshaker tracer is off: call it "
                "before importing grpc, or export GRPC_TRACE=handshaker")
    return ""


_capture: HandshakeCapture | None = None
_capture_lock = threading.Lock()


def capture_handshakes() -> HandshakeCapture:
    """Start (once per process) relaying stderr and reporting failed TLS handshakes. Call it before
    grpc is imported. Check `.active` / `.problem` on the result."""
    global _capture
    with _capture_lock:
        if _capture is None or not _capture.active:
            _capture = HandshakeCapture().start()
        return _capture


def current_capture() -> HandshakeCapture | None:
    """The process's active capture, if `capture_handshakes()` started one."""
    return _capture if _capture is not None and _capture.active else None


MAX_REMEMBERED_PEERS = 1024


class PeerOnce:
    """True the first time a peer address is seen among the last MAX_REMEMBERED_PEERS (a TLS 1.2
    connection's calls are all refused; it counts once)."""

    def __init__(self, size: int = MAX_REMEMBERED_PEERS) -> None:
        self._seen: deque[str] = deque(maxlen=size)
        self._set: set[str] = set()

    def __call__(self, peer: str) -> bool:
        if peer in self._set:
            return False
        if len(self._seen) == self._seen.maxlen:
            self._set.discard(self._seen[0])
        self._seen.append(peer)
        self._set.add(peer)
        return True


def peer_address(grpc_peer: str) -> str:
    """grpc's `context.peer()` ("ipv4:127.0.0.1:5") as "127.0.0.1:5"."""
    return _address(grpc_peer)

