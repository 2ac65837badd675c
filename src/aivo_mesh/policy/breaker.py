"""Circuit breaker: stop sending to a target service that keeps failing, and probe until it recovers.

Why per target service, not per method: a sick upstream (crashed pods, exhausted pool, broken
dependency) is sick for all its methods, and Envoy (per cluster) and Linkerd (per backend) scope
it the same way. Per-(service, method) breakers are possible by keying `CircuitBreaker`s by
(service, method) in stack.py; the layer does not care.

Why it judges logical calls, not attempts: the layer sits above retry (stack.py), so it counts
what the caller got after retries, and an attempt that failed but was retried to success counts
for nothing. Counting attempts let a one-second stall open it for everyone: the per-try timeouts
of calls that were still retrying, and that mostly went on to succeed, added up to 5 at once.
A bad endpoint among good ones is outlier detection's job (outlier.py, per endpoint and per
attempt, as Envoy's and Linkerd's); retries move to the other endpoints, so the service's calls
keep succeeding and this breaker stays closed. A dead service fails every call after retries,
so 5 failed calls open it and every later call fails fast, with no attempt on the network.

    CLOSED ──(trip rule)──> OPEN ──(probe wait passed, checked on admit)──> HALF_OPEN
       ^                     ^                                                  │
       │                     └────────────── a probe fails ─────────────────────┤
       └──────────── half_open_max_calls probes succeed ────────────────────────┘
    FORCED_OPEN, DISABLED: operator states (reject all / admit all, count nothing); reset() -> CLOSED.

Probe wait (Linkerd's failure accrual, Finagle's): the n-th opening in a row waits
`uniform(c / 2, c)`, c = min(recovery_time, first_probe * 2**(n-1)) (backoff.EqualJitter): about a
second after a stall, doubling with each failed probe up to `recovery_time` for a service that
stays down. Closing resets n. Jitter keeps the callers that opened together from probing together.

Trip rules: `consecutive` = `consecutive_failures` FAILURE/RETRYABLE outcomes in a row (any
SUCCESS or TRANSIENT resets the count); `failure_rate` = failures >= `failure_rate_threshold` % of
the last `window_size` calls (a count-based ring), once at least `minimum_calls` are in it (clamped
to window_size). IGNORED outcomes (the caller's CANCELLED, local replies), cancelled calls and
exceptions escaping the stack (the caller's: a request grpc refused to send) never count.
HALF_OPEN admits at most `half_open_max_calls` probes at once; slots are released when the probe
ends, also by cancellation. Outcomes of calls admitted before the last state change are dropped (a
slow call admitted while CLOSED must not close a breaker that opened since).

State names are "closed", "open", "half_open", "forced_open", "disabled" in code, listener events
and messages. Numeric gauge (STATE_GAUGE): 0 closed, 1 half_open, 2 open, 3 forced_open, 4 disabled.
Transitions are synchronous and O(1); nothing is awaited while the state is being changed
(pybreaker's lock held across the call is what not to copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random
from typing import ClassVar, Literal

from aivo_mesh.policy.backoff import EqualJitter
from aivo_mesh.policy.classify import DEFAULT_CLASSIFIER, HEALTHY, IGNORED, SUCCESS, Classifier, Outcome
from aivo_mesh.policy.core import Call, Clock, Handler, LocalReason, Reply, monotonic, when_ended
from aivo_mesh.policy.events import NOOP, PolicyListener

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
FORCED_OPEN = "forced_open"
DISABLED = "disabled"
STATE_GAUGE: dict[str, int] = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2, FORCED_OPEN: 3, DISABLED: 4}

REJECTED = -1  # the ticket `admit` returns when the call must not go out


@dataclass(frozen=True, slots=True)
class BreakerParams:
    mode: Literal["consecutive", "failure_rate"] = "consecutive"
    consecutive_failures: int = 5
    recovery_time: float = 60.0
    half_open_max_calls: int = 1
    first_probe: float = 1.0
    failure_rate_threshold: float = 50.0
    window_size: int = 100
    minimum_calls: int = 20

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures!r}")
        if not self.recovery_time > 0:
            raise ValueError(f"recovery_time must be > 0 seconds, got {self.recovery_time!r}")
        if not self.first_probe > 0:
            raise ValueError(f"first_probe must be > 0 seconds, got {self.first_probe!r}")
        if self.half_open_max_calls < 1:
            raise ValueError(f"half_open_max_calls must be >= 1, got {self.half_open_max_calls!r}")
        if not 0.0 <= self.failure_rate_threshold <= 100.0:
            raise ValueError(f"failure_rate_threshold must be in [0, 100], got {self.failure_rate_threshold!r}")
        if self.window_size < 1 or self.minimum_calls < 1:
            raise ValueError("window_size and minimum_calls must be >= 1")

    @property
    def probe_backoff(self) -> EqualJitter:
        """The wait before the next probe; a first_probe above recovery_time is capped there."""
        return EqualJitter(base=min(self.first_probe, self.recovery_time), cap=self.recovery_time)


# -- trip rules: when does CLOSED open? ------------------------------------------------------
class ConsecutiveFailures:
    __slots__ = ("count", "threshold")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.count = 0

    def on_success(self) -> None:
        self.count = 0

    def on_failure(self) -> bool:
        """Count a failure; True if the breaker must open."""
        self.count += 1
        return self.count >= self.threshold

    def reset(self) -> None:
        self.count = 0


class FailureRate:
    """Failures over the last `size` calls, in a ring: O(1) per outcome."""

    __slots__ = ("failures", "filled", "minimum", "pos", "ring", "size", "threshold")

    def __init__(self, threshold_percent: float, size: int, minimum: int) -> None:
        self.threshold = threshold_percent
        self.size = size
        self.minimum = min(minimum, size)
        self.ring = [0] * size
        self.pos = 0
        self.filled = 0
        self.failures = 0

    def _push(self, failed: int) -> None:
        if self.filled == self.size:
            self.failures -= self.ring[self.pos]
        else:
            self.filled += 1
        self.ring[self.pos] = failed
        self.failures += failed
        self.pos = self.pos + 1 if self.pos + 1 < self.size else 0

    def on_success(self) -> None:
        self._push(0)

    def on_failure(self) -> bool:
        self._push(1)
        return self.filled >= self.minimum and self.failures * 100 >= self.threshold * self.filled

    def reset(self) -> None:
        self.ring = [0] * self.size
        self.pos = self.filled = self.failures = 0


TripRule = ConsecutiveFailures | FailureRate


# -- states: each overrides only its hooks; counters live in the breaker ----------------------
class BreakerState:
    name: ClassVar[str]
    reject_details: ClassVar[str] = "Circuit breaker OPEN for {service}"

    def admit(self, b: CircuitBreaker) -> int:
        """A ticket (the breaker's generation) if the call may go out, else REJECTED."""
        return b._gen

    def on_success(self, b: CircuitBreaker) -> None: ...

    def on_failure(self, b: CircuitBreaker) -> None: ...

    def on_ignored(self, b: CircuitBreaker) -> None: ...


class Closed(BreakerState):
    name = CLOSED

    def on_success(self, b: CircuitBreaker) -> None:
        b._rule.on_success()

    def on_failure(self, b: CircuitBreaker) -> None:
        if b._rule.on_failure():
            b._to(OPEN_STATE)


class Open(BreakerState):
    name = OPEN

    def admit(self, b: CircuitBreaker) -> int:
        if b._clock() >= b._probe_at:
            b._to(HALF_OPEN_STATE)
            return HALF_OPEN_STATE.admit(b)
        return REJECTED


class HalfOpen(BreakerState):
    name = HALF_OPEN
    reject_details = "Circuit breaker OPEN for {service} (half-open: probes in flight)"

    def admit(self, b: CircuitBreaker) -> int:
        if b._probes < b.params.half_open_max_calls:
            b._probes += 1
            return b._gen
        return REJECTED

    def on_success(self, b: CircuitBreaker) -> None:
        b._probes -= 1
        b._probe_successes += 1
        if b._probe_successes >= b.params.half_open_max_calls:
            b._to(CLOSED_STATE)

    def on_failure(self, b: CircuitBreaker) -> None:
        b._to(OPEN_STATE)

    def on_ignored(self, b: CircuitBreaker) -> None:
        b._probes -= 1


class ForcedOpen(BreakerState):
    name = FORCED_OPEN
    reject_details = "Circuit breaker OPEN for {service} (forced open by an operator)"

    def admit(self, b: CircuitBreaker) -> int:
        return REJECTED


class Disabled(BreakerState):
    name = DISABLED


CLOSED_STATE, OPEN_STATE, HALF_OPEN_STATE = Closed(), Open(), HalfOpen()
FORCED_OPEN_STATE, DISABLED_STATE = ForcedOpen(), Disabled()


class CircuitBreaker:
    """The breaker of one target service: `admit()` -> ticket, then `record(ticket, outcome)`."""

    __slots__ = ("_backoff", "_clock", "_gen", "_listener", "_openings", "_probe_at", "_probe_successes", "_probes",
                 "_rejections", "_rng", "_rule", "_state", "params", "service")

    def __init__(self, service: str, params: BreakerParams = BreakerParams(), *, clock: Clock = monotonic,
                 listener: PolicyListener = NOOP, rng: Random | None = None) -> None:
        self.service = service
        self.params = params
        self._clock = clock
        self._listener = listener
        self._rng = rng if rng is not None else Random()
        self._backoff = params.probe_backoff
        self._rule: TripRule = (
            FailureRate(params.failure_rate_threshold, params.window_size, params.minimum_calls)
            if params.mode == "failure_rate" else ConsecutiveFailures(params.consecutive_failures))
        self._state: BreakerState = CLOSED_STATE
        self._gen = 0
        self._openings = 0  # OPEN entered this many times since the breaker was last CLOSED
        self._probe_at = 0.0  # when OPEN: the clock time from which a probe is admitted
        self._probes = 0
        self._probe_successes = 0
        # Built once: a rejection allocates nothing.
        self._rejections = {s.name: Reply("UNAVAILABLE", details=s.reject_details.format(service=service),
                                          local=LocalReason.CIRCUIT_OPEN)
                            for s in (OPEN_STATE, HALF_OPEN_STATE, FORCED_OPEN_STATE)}

    # -- the call path ------------------------------------------------------------------------
    def admit(self) -> int:
        """A ticket >= 0 to pass to `record`/`release`, or REJECTED."""
        return self._state.admit(self)

    def record(self, ticket: int, outcome: Outcome, code: str = "") -> None:
        """The outcome of a call admitted with `ticket`."""
        if ticket != self._gen:
            return  # admitted under an earlier state: says nothing about this one
        state = self._state
        if outcome is SUCCESS and state is CLOSED_STATE:  # the common case, one call less
            self._rule.on_success()
        elif outcome in HEALTHY:
            state.on_success(self)
        elif outcome is IGNORED:
            state.on_ignored(self)
        elif state is not DISABLED_STATE:
            self._listener.breaker_failure(self.service, code)
            state.on_failure(self)

    def release(self, ticket: int) -> None:
        """The admitted call ended without an outcome (cancelled): free its probe slot, count nothing."""
        self.record(ticket, IGNORED)

    def rejection(self) -> Reply:
        """The local reply for a rejected call (its details always contain "Circuit breaker OPEN")."""
        return self._rejections.get(self._state.name) or self._rejections[OPEN]

    # -- introspection and operator actions ---------------------------------------------------
    @property
    def state(self) -> str:
        """The current state's name; OPEN turns HALF_OPEN here too once the probe wait has passed."""
        if self._state is OPEN_STATE and self._clock() >= self._probe_at:
            self._to(HALF_OPEN_STATE)
        return self._state.name

    @property
    def gauge(self) -> int:
        return STATE_GAUGE[self.state]

    @property
    def next_probe_in(self) -> float | None:
        """Seconds until OPEN admits a probe, or None when not OPEN (a due probe makes it HALF_OPEN)."""
        if self.state != OPEN:
            return None
        return self._probe_at - self._clock()

    def reset(self) -> None:
        """-> CLOSED with clean counters (the admin endpoint's reset)."""
        self._to(CLOSED_STATE)

    def force_open(self) -> None:
        self._to(FORCED_OPEN_STATE)

    def disable(self) -> None:
        self._to(DISABLED_STATE)

    def retire(self) -> str:
        """This breaker was replaced (a live policy change) by one with other parameters: it stops
        reporting, and its state's name is returned for the replacement's first report.

        Calls of the old stack still admit into it and record their outcomes here (they finish under
        the policy they started with), but what it does from now on must not reach the listeners:
        a late "open" from it would overwrite the new breaker's state in the gauge."""
        self._listener = NOOP
        return self._state.name

    def _to(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._gen += 1
        if new is CLOSED_STATE:
            self._rule.reset()
            self._openings = 0
        elif new is OPEN_STATE:
            self._openings += 1
            self._probe_at = self._clock() + self._backoff.delay(self._openings, 0.0, self._rng)
        elif new is HALF_OPEN_STATE:
            self._probes = self._probe_successes = 0
        if old is not new:
            self._listener.breaker_state(self.service, old.name, new.name)


class BreakerLayer:
    """Fails fast with a local UNAVAILABLE while the breaker is open; reports each call's final outcome
    (it sits above retry: one admission and one outcome per logical call)."""

    name = "breaker"

    def __init__(self, breaker: CircuitBreaker, classifier: Classifier = DEFAULT_CLASSIFIER,
                 listener: PolicyListener = NOOP) -> None:
        self.breaker = breaker
        self.classifier = classifier
        self.listener = listener

    def wrap(self, inner: Handler) -> Handler:
        breaker, classify, listener = self.breaker, self.classifier.classify, self.listener

        async def handle(call: Call) -> Reply:
            ticket = breaker.admit()
            if ticket < 0:
                listener.breaker_rejected(call.service, call.method)
                return breaker.rejection()
            try:
                reply = await inner(call)
            except BaseException:
                # The terminal maps every answer and transport failure to a Reply, so what escapes is
                # the caller's own (cancellation, a request or metadata grpc refused to send) or a
                # bug: it says nothing about the upstream. Free the probe slot, count nothing.
                breaker.release(ticket)
                raise
            if reply.ended is None:
                breaker.record(ticket, classify(reply), reply.code)
            else:  # a stream counts by how it ends
                when_ended(reply, lambda final: breaker.record(ticket, classify(final), final.code))
            return reply

        return handle
