"""PolicyListener: how layers report what they decided, without importing metrics or logging.

Every method has a no-op default (pybreaker's listener model), so a subscriber overrides only
what it needs. telemetry/ registers one listener that turns these into Prometheus/StatsD series.
Methods are called synchronously from the call path: keep them O(1) and never raise.
"""

from __future__ import annotations


class PolicyListener:
    def call_started(self, service: str, method: str) -> None: ...

    def call_finished(self, service: str, method: str, code: str, seconds: float, attempts: int,
                      local: bool) -> None: ...

    def retry(self, service: str, method: str, attempt: int, code: str, delay: float) -> None: ...

    def retry_budget_exhausted(self, service: str, method: str) -> None: ...

    def breaker_state(self, service: str, old: str, new: str) -> None: ...

    def breaker_failure(self, service: str, code: str) -> None: ...

    def breaker_rejected(self, service: str, method: str) -> None: ...

    def limit_rejected(self, service: str, method: str, limit: str) -> None: ...

    def endpoint_ejected(self, service: str, endpoint: str, seconds: float) -> None: ...

    def endpoint_restored(self, service: str, endpoint: str) -> None: ...


class Listeners(PolicyListener):
    """Fan-out to several listeners; a failing listener never breaks a call."""

    def __init__(self, *listeners: PolicyListener) -> None:
        self.listeners = list(listeners)

    def add(self, listener: PolicyListener) -> None:
        self.listeners.append(listener)

    def __getattribute__(self, name: str):  # type: ignore[no-untyped-def]
        if name.startswith("_") or name in ("listeners", "add"):
            return object.__getattribute__(self, name)
        targets = object.__getattribute__(self, "listeners")

        def fan_out(*args: object) -> None:
            for t in targets:
                try:
                    getattr(t, name)(*args)
                except Exception:  # noqa: BLE001 - telemetry must not fail a call
                    pass

        return fan_out


NOOP = PolicyListener()
