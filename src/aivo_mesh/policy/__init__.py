"""The policy core: pure Python, no grpc, injected clock, RNG and sleep (see core.py).

The client-side stack for one target service is built by `TargetPolicy` (stack.py, which also
states the layer order once); each layer lives in its own module with its frozen params, which
bind.py builds from mesh.yaml (the layer modules import nothing from config/).
"""

from aivo_mesh.policy.backoff import DecorrelatedJitter, FullJitter, parse_pushback
from aivo_mesh.policy.balancer import Balancer, BalancerLayer
from aivo_mesh.policy.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    STATE_GAUGE,
    BreakerLayer,
    BreakerParams,
    CircuitBreaker,
)
from aivo_mesh.policy.budget import RetryBudget, RetryBudgetParams
from aivo_mesh.policy.classify import Classifier, Outcome, retryable_codes
from aivo_mesh.policy.core import Call, Clock, Handler, Layer, Reply, build_stack, monotonic
from aivo_mesh.policy.deadline import DeadlineLayer, DeadlineParams, attempt_timeout, effective_timeout
from aivo_mesh.policy.events import NOOP, Listeners, PolicyListener, ServerCall, ServerCallObserver
from aivo_mesh.policy.limit import ConcurrencyLimit, LimitLayer, LimitParams
from aivo_mesh.policy.outlier import EndpointState, OutlierDetector, OutlierRule
from aivo_mesh.policy.retry import Attempt, GiveUp, RetryLayer, RetryParams, RetryState, Sleep, next_step
from aivo_mesh.policy.stack import CLIENT_ORDER, MethodParams, TargetPolicy, client_layers, layer_names

__all__ = [
    "CLIENT_ORDER",
    "CLOSED",
    "HALF_OPEN",
    "NOOP",
    "OPEN",
    "STATE_GAUGE",
    "Attempt",
    "Balancer",
    "BalancerLayer",
    "BreakerLayer",
    "BreakerParams",
    "Call",
    "CircuitBreaker",
    "Classifier",
    "Clock",
    "ConcurrencyLimit",
    "DeadlineLayer",
    "DeadlineParams",
    "DecorrelatedJitter",
    "EndpointState",
    "FullJitter",
    "GiveUp",
    "Handler",
    "Layer",
    "LimitLayer",
    "LimitParams",
    "Listeners",
    "MethodParams",
    "Outcome",
    "OutlierDetector",
    "OutlierRule",
    "PolicyListener",
    "Reply",
    "RetryBudget",
    "RetryBudgetParams",
    "RetryLayer",
    "RetryParams",
    "RetryState",
    "ServerCall",
    "ServerCallObserver",
    "Sleep",
    "TargetPolicy",
    "attempt_timeout",
    "build_stack",
    "client_layers",
    "effective_timeout",
    "layer_names",
    "monotonic",
    "next_step",
    "parse_pushback",
    "retryable_codes",
]
