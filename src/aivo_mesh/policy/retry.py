"""Retry: decide, then act (tenacity's shape), so every rule is a pure function tested alone.

`next_step(state, params, call, now, budget, rng)` looks at the last attempt and answers Attempt
(retry now), Sleep(seconds) (retry after a wait) or GiveUp(reason, reply). `RetryLayer` is the thin
shell that acts on the answer; it is the only code in the policy core that sleeps, with `sleep`
injected so a test's back-off costs no wall time.

The rules, in the order they are checked:
  - local replies (the balancer's "no endpoints") are never retried: they did not reach the upstream;
  - only RETRYABLE outcomes are retried (classify.py: the route's `retry_on`; codes other than
    UNAVAILABLE only on idempotent routes);
  - never once `call.committed` (a response message was received);
  - at most `max_retries` retries: the route's, capped by the client-wide MeshConfig.max_retries;
  - pushback: n ms -> wait exactly n ms (and restart the back-off); invalid -> give up;
  - the wait never outlives the deadline: if it would reach `call.deadline`, give up with the last reply;
  - the retry budget must allow it (budget.py), else give up and report `retry_budget_exhausted`.

Each attempt increments `call.attempt` (1, 2, ...), which the adapter sends as `core.ATTEMPT_HEADER`.
Caller cancellation (asyncio.CancelledError) is never caught: it stops the loop at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from random import Random

from aivo_mesh.policy.backoff import STOP, Backoff, FullJitter, parse_pushback
from aivo_mesh.policy.budget import UNLIMITED, Budget
from aivo_mesh.policy.classify import DEFAULT_CLASSIFIER, RETRIED, Classifier
from aivo_mesh.policy.core import Call, Clock, Handler, LocalReason, Reply, monotonic
from aivo_mesh.policy.events import NOOP, PolicyListener

Sleeper = Callable[[float], Awaitable[None]]
DEFAULT_BACKOFF = FullJitter()


@dataclass(frozen=True, slots=True)
class RetryParams:
    """The retry policy of one route."""

    max_retries: int = 3
    backoff: Backoff = DEFAULT_BACKOFF
    classifier: Classifier = DEFAULT_CLASSIFIER
    per_try_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries!r}")
        if self.per_try_timeout is not None and not self.per_try_timeout > 0:
            raise ValueError(f"per_try_timeout must be > 0 seconds, got {self.per_try_timeout!r}")


NO_RETRIES = RetryParams(max_retries=0)


# -- the decision -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Attempt:
    """Retry now."""


@dataclass(frozen=True, slots=True)
class Sleep:
    """Retry after `seconds`."""

    seconds: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop; `reply` is what the caller gets."""

    reason: str
    reply: Reply


Step = Attempt | Sleep | GiveUp
ATTEMPT = Attempt()

# GiveUp reasons.
LOCAL = "local"
NOT_RETRYABLE = "not_retryable"
COMMITTED = "committed"
MAX_RETRIES = "max_retries"
PUSHBACK = "pushback"
DEADLINE = "deadline"
BUDGET = "budget"


@dataclass(slots=True)
class RetryState:
    """One logical call's retry bookkeeping (the back-offs themselves are stateless)."""

    reply: Reply  # the last attempt's reply
    retries: int = 0  # retries decided so far
    backoff_n: int = 0  # retries since the last pushback (the back-off exponent)
    previous_delay: float = 0.0


def next_step(state: RetryState, params: RetryParams, call: Call, now: float,
              budget: Budget, rng: Random) -> Step:
    """Decide what follows `state.reply`. A retry decision is recorded in `state` and reserves one
    retry from `budget` (the caller must `release()` it after the attempt; `UNLIMITED`: no budget)."""
    reply = state.reply
    if reply.local:
        return GiveUp(LOCAL, reply)
    if params.classifier.classify(reply) not in RETRIED:
        return GiveUp(NOT_RETRYABLE, reply)
    if call.committed:
        return GiveUp(COMMITTED, reply)
    if state.retries >= params.max_retries:
        return GiveUp(MAX_RETRIES, reply)
    pushback = parse_pushback(reply.trailers)
    if pushback is STOP:
        return GiveUp(PUSHBACK, reply)
    delay = params.backoff.delay(state.backoff_n + 1, state.previous_delay, rng) if pushback is None else pushback
    if call.deadline is not None and now + delay >= call.deadline:
        return GiveUp(DEADLINE, reply)
    if not budget.try_withdraw():
        return GiveUp(BUDGET, reply)
    state.retries += 1
    state.backoff_n = 0 if pushback is not None else state.backoff_n + 1
    state.previous_delay = delay
    return Sleep(delay) if delay > 0 else ATTEMPT


# -- the shell --------------------------------------------------------------------------------
class RetryLayer:
    """Runs attempts until `next_step` gives up. Deposits into the budget once per logical call."""

    name = "retry"

    def __init__(self, params: RetryParams, *, budget: Budget = UNLIMITED, rng: Random | None = None,
                 sleep: Sleeper = asyncio.sleep, clock: Clock = monotonic,
                 listener: PolicyListener = NOOP) -> None:
        self.params = params
        self.budget = budget
        self.rng = rng if rng is not None else Random()
        self.sleep = sleep
        self.clock = clock
        self.listener = listener

    def wrap(self, inner: Handler) -> Handler:
        params, budget, rng, sleep, clock, listener = (self.params, self.budget, self.rng, self.sleep,
                                                       self.clock, self.listener)
        per_try = params.per_try_timeout
        no_retries = params.max_retries == 0

        async def retry(call: Call, reply: Reply) -> Reply:
            state = RetryState(reply)
            while True:
                step = next_step(state, params, call, clock(), budget, rng)
                if isinstance(step, GiveUp):
                    if step.reason == BUDGET:
                        listener.retry_budget_exhausted(call.service, call.method)
                    return step.reply
                # A retry is reserved in the budget from here until its attempt ends.
                try:
                    delay = step.seconds if isinstance(step, Sleep) else 0.0
                    listener.retry(call.service, call.method, call.attempt + 1, state.reply.code, delay)
                    if delay > 0:
                        await sleep(delay)
                        if call.deadline is not None and clock() >= call.deadline:
                            return Reply("DEADLINE_EXCEEDED", details="deadline exceeded during retry back-off",
                                         local=LocalReason.DEADLINE)
                    call.attempt += 1
                    state.reply = await inner(call)
                finally:
                    budget.release()
                if state.reply.code == "OK":
                    return state.reply

        async def handle(call: Call) -> Reply:
            budget.deposit()
            call.per_try_timeout = per_try
            reply = await inner(call)
            if reply.code == "OK" or no_retries:
                return reply
            return await retry(call, reply)

        return handle
