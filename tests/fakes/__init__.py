"""In-repo FAKES of external servers for tests: not the real thing, only what the tests need.

- `consul_agent.FakeConsulAgent`: a subset of the documented Consul HTTP API (agent registration,
  health queries with blocking `index`/`wait`, catalog services), with knobs to flip check status,
  move the index backwards and inject errors.
- `dns_server.FakeDnsServer`: a UDP DNS server answering A/AAAA/SRV from a dict the test edits.
- `observer_api.FakeObserverApi`: canned documents of the observer's HTTP API behind the real dashboard
  files, for page-level tests of the dashboard (its end-to-end test uses a real `meshctl up`).

All run in a background thread on 127.0.0.1 with an OS-chosen port and are loop-agnostic, so
async code under test (in the test's event loop, or in daemon threads) talks to them over real
sockets.
"""
