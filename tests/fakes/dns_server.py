"""FakeDnsServer: a FAKE UDP DNS server for tests, answering A/AAAA/SRV from a dict you edit.

Not a resolver and not a real authoritative server: no zones, no SOA in negative answers, no
recursion, no TCP. Built on dnspython's `dns.message`:

    with FakeDnsServer() as dns_server:
        dns_server.set("auth.test.", "A", ["10.0.0.5"], ttl=30)
        dns_server.set_srv("_grpc._tcp.auth.test.", [(10, 5, 50051, "a1.test.")], ttl=30)
        resolver.nameservers, resolver.port = ["127.0.0.1"], dns_server.port

Answers: the records for (name, type) if any (NOERROR); NOERROR with an empty answer if the name has
records of other types (NODATA); NXDOMAIN otherwise. SRV answers carry the A/AAAA records of their
targets in the additional section when `glue` is on (as Consul's DNS interface does).
Knobs: `rcode` (answer everything with e.g. SERVFAIL), `drop` (answer nothing: client timeouts),
`drop_types` (answer nothing for those query types only, e.g. {"AAAA"}: a middlebox that eats AAAA),
`queries` (log of (name, type)) and `wait_for_queries(n, timeout)` (condition wait, no polling).
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterable, Sequence

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def _key(name: str) -> str:
    name = name.lower()
    return name if name.endswith(".") else name + "."


class FakeDnsServer:
    def __init__(self, host: str = "127.0.0.1", glue: bool = True) -> None:
        self.host = host
        self.glue = glue
        self.rcode: dns.rcode.Rcode | None = None
        self.drop = False
        self.drop_types: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self._records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    # -- records ---------------------------------------------------------------------------------
    def set(self, name: str, rdtype: str, values: Iterable[str], ttl: int = 30) -> None:
        """Replace the records of (name, rdtype); `values` in zone-file text ("10.0.0.5")."""
        with self._cond:
            self._records[(_key(name), rdtype.upper())] = (ttl, list(values))

    def set_srv(self, name: str, records: Sequence[tuple[int, int, int, str]], ttl: int = 30) -> None:
        """SRV records as (priority, weight, port, target)."""
        self.set(name, "SRV", [f"{p} {w} {port} {_key(t) if t != '.' else '.'}" for p, w, port, t in records], ttl)

    def delete(self, name: str, rdtype: str | None = None) -> None:
        with self._cond:
            for key in [k for k in self._records if k[0] == _key(name) and rdtype in (None, k[1])]:
                del self._records[key]

    def wait_for_queries(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.queries) >= count, timeout)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeDnsServer:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((self.host, 0))
        self._thread = threading.Thread(target=self._serve, name="fake-dns", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FakeDnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._sock is not None, "not started"
        return int(self._sock.getsockname()[1])

    # -- serving ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    data, peer = self._sock.recvfrom(65535)
                    reply = self._answer(data)
                    if reply is not None:
                        self._sock.sendto(reply, peer)
        finally:
            sel.close()

    def _answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        with self._cond:
            for q in query.question:
                self.queries.append((q.name.to_text().lower(), dns.rdatatype.to_text(q.rdtype)))
            self._cond.notify_all()
            if self.drop or any(dns.rdatatype.to_text(q.rdtype) in self.drop_types for q in query.question):
                return None
            if self.rcode is not None:
                response.set_rcode(self.rcode)
                return bytes(response.to_wire())
            for q in query.question:
                name = q.name.to_text().lower()
                rdtype = dns.rdatatype.to_text(q.rdtype)
                found = self._records.get((name, rdtype))
                if found is None:
                    if not any(k[0] == name for k in self._records):
                        response.set_rcode(dns.rcode.NXDOMAIN)
                    continue
                ttl, values = found
                response.answer.append(dns.rrset.from_text_list(q.name, ttl, dns.rdataclass.IN, rdtype, values))
                if rdtype == "SRV" and self.glue:
                    self._add_glue(response, values)
        return bytes(response.to_wire())

    def _add_glue(self, response: dns.message.Message, srv_values: list[str]) -> None:
        for value in srv_values:
            target = value.split()[-1].lower()
            for rdtype in ("A", "AAAA"):
                found = self._records.get((target, rdtype))
                if found is not None:
                    ttl, values = found
                    response.additional.append(
                        dns.rrset.from_text_list(dns.name.from_text(target), ttl, dns.rdataclass.IN, rdtype, values))
