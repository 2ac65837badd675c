"""The client half of the peer policy: the server's certificate, checked before a call uses a connection.

grpc core checks the chain against the mesh CA and the service's DNS name (`grpc.default_authority`), and
refuses TLS 1.2 (aivo_mesh.tls); it does not check the SPIFFE ID or anything else the peer policy asks
(pki/peer.py), and Python gets no handshake callback (grpc#32635). What Python can read is channelz: each
connected socket's remote certificate. So, per endpoint channel:

    not vetted  the next call waits for the channel to be READY, then every socket it has is checked
                (the certificate the server sent, as the target's identity, role "server");
                refused: the call fails UNAVAILABLE naming the rule, the channel is closed and rebuilt
                (a bad server keeps no connection), and the listener hears `peer_refused`;
    vetted      calls go straight on (a dictionary lookup); the first change of connectivity
                (the connection dropped, GOAWAY, max age) makes it "not vetted" again.

Limits, stated in docs/certificates.md: channelz gives the leaf only (the chain's intermediate is checked
by TLS against the mesh bundle); and a reconnection that completes between two of our loop iterations, with
a call issued in the same instant, can carry that one call before the check sees the new connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc._cython import cygrpc

from aivo_mesh.policy.events import PolicyListener

if TYPE_CHECKING:  # the certificate parser (cryptography) comes with the first connection to check
    from aivo_mesh.pki.peer import PeerPolicy, PeerRefused

log = logging.getLogger(__name__)


def _channelz(fn: Callable[[int], str], ident: int) -> dict[str, Any]:
    try:
        return dict(json.loads(fn(ident)))
    except (ValueError, RuntimeError):  # gone since it was listed
        return {}


def remote_certificates(target: str) -> dict[int, bytes | None]:
    """{socket id: the PEM the server sent (None without TLS)} for every connected socket of every channel
    of this process whose target is `target` (`host:port`, as given to the channel)."""
    out: dict[int, bytes | None] = {}
    start = 0
    while True:
        page = json.loads(cygrpc.channelz_get_top_channels(start))
        for ch in page.get("channel", []):
            name = str(ch.get("data", {}).get("target", ""))
            if name != target and not name.endswith("/" + target):
                continue
            for ref in ch.get("subchannelRef", []):
                sub = _channelz(cygrpc.channelz_get_subchannel, int(ref["subchannelId"])).get("subchannel", {})
                for sref in sub.get("socketRef", []):
                    sid = int(sref["socketId"])
                    sock = _channelz(cygrpc.channelz_get_socket, sid).get("socket", {})
                    tls = sock.get("security", {}).get("tls", {})
                    pem = tls.get("remoteCertificate")
                    out[sid] = base64.b64decode(pem) if pem else None
            start = max(start, int(ch["ref"]["channelId"]) + 1)
        if page.get("end", True) or not page.get("channel"):
            return out


class ServerCheck:
    """Vets the connections of one target's endpoint channels (see the module docstring)."""

    def __init__(self, service: str, expect: str | None, policy: PeerPolicy, listener: PolicyListener,
                 channel: Callable[[str], grpc.aio.Channel], discard: Callable[[str], None]) -> None:
        self.service = service
        self.expect = expect
        self.policy = policy
        self._listener = listener
        self._channel = channel
        self._discard = discard  # close an endpoint's channel; the next call opens a new one
        self.vetted: dict[str, bool] = {}
        self._good_sockets: set[int] = set()
        self._watches: dict[str, asyncio.Task[None]] = {}

    def set_policy(self, policy: PeerPolicy) -> None:
        """A new policy (revocation): every connection is checked again before its next call."""
        self.policy = policy
        self._good_sockets.clear()
        self.vetted.clear()

    async def vet(self, endpoint: str, timeout: float | None) -> PeerRefused | None:
        """Wait (within `timeout`) for the endpoint's connection and check its server certificate.

        None when the call may go on: vetted, or the channel did not connect (the call then fails as grpc
        fails it, with grpc's own reason, e.g. a refused TLS 1.2 handshake)."""
        ch = self._channel(endpoint)
        state = ch.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                return None
            try:
                await asyncio.wait_for(ch.wait_for_state_change(state), timeout)
            except TimeoutError:
                return None
            state = ch.get_state()
        refused = self._check_sockets(endpoint)
        if refused is not None:
            self._listener.peer_refused(self.service, endpoint, str(refused.rule))
            log.warning("server certificate refused", extra={
                "service": self.service, "endpoint": endpoint, "rule": str(refused.rule), "reason": refused.detail})
            self._discard(endpoint)
            return refused
        self.vetted[endpoint] = True
        self._watch(endpoint, ch)
        return None

    def _check_sockets(self, endpoint: str) -> PeerRefused | None:
        from aivo_mesh.pki.peer import PeerRefused, Rule

        for sid, pem in remote_certificates(endpoint).items():
            if sid in self._good_sockets:
                continue
            if pem is None:
                return PeerRefused(Rule.UNPARSEABLE, "the connection carries no server certificate")
            try:
                self.policy.check_pem(pem, "server", self.expect)
            except PeerRefused as exc:
                return exc
            self._good_sockets.add(sid)
        return None

    def _watch(self, endpoint: str, ch: grpc.aio.Channel) -> None:
        old = self._watches.get(endpoint)
        if old is not None and not old.done():
            return

        async def until_changed() -> None:
            with contextlib.suppress(Exception):
                await ch.wait_for_state_change(grpc.ChannelConnectivity.READY)
            self.vetted.pop(endpoint, None)

        self._watches[endpoint] = asyncio.get_running_loop().create_task(until_changed())

    def forget(self, endpoint: str) -> None:
        """The endpoint's channel was closed or replaced: its next connection is checked afresh."""
        self.vetted.pop(endpoint, None)
        task = self._watches.pop(endpoint, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        for endpoint in list(self._watches):
            self.forget(endpoint)


def refusal_details(service: str, endpoint: str, refused: PeerRefused) -> str:
    return f"server certificate of {service} at {endpoint} refused: {refused}"
