"""The policy core: pure Python, no grpc, injected clock, RNG and sleep (see core.py).

The client-side stack for one target service is built by `TargetPolicy` (stack.py, which also
states the layer order once); each layer lives in its own module with its frozen params, which
bind.py builds from mesh.yaml (the layer modules import nothing from config/).
"""

from typing import TYPE_CHECKING

from aivo_mesh._lazy import lazy_getattr

if TYPE_CHECKING:
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

# Each name is imported from its module on first use: `from aivo_mesh.policy.core import ...` (MeshClient's
# module) then loads core.py alone, not every layer, nor stack.py, which reads mesh.yaml's model (pydantic).
__getattr__ = lazy_getattr(__name__, {
    **dict.fromkeys(("DecorrelatedJitter", "FullJitter", "parse_pushback"), "backoff"),
    **dict.fromkeys(("Balancer", "BalancerLayer"), "balancer"),
    **dict.fromkeys(("CLOSED", "HALF_OPEN", "OPEN", "STATE_GAUGE", "BreakerLayer", "BreakerParams",
                     "CircuitBreaker"), "breaker"),
    **dict.fromkeys(("RetryBudget", "RetryBudgetParams"), "budget"),
    **dict.fromkeys(("Classifier", "Outcome", "retryable_codes"), "classify"),
    **dict.fromkeys(("Call", "Clock", "Handler", "Layer", "Reply", "build_stack", "monotonic"), "core"),
    **dict.fromkeys(("DeadlineLayer", "DeadlineParams", "attempt_timeout", "effective_timeout"), "deadline"),
    **dict.fromkeys(("NOOP", "Listeners", "PolicyListener", "ServerCall", "ServerCallObserver"), "events"),
    **dict.fromkeys(("ConcurrencyLimit", "LimitLayer", "LimitParams"), "limit"),
    **dict.fromkeys(("EndpointState", "OutlierDetector", "OutlierRule"), "outlier"),
    **dict.fromkeys(("Attempt", "GiveUp", "RetryLayer", "RetryParams", "RetryState", "Sleep", "next_step"), "retry"),
    **dict.fromkeys(("CLIENT_ORDER", "MethodParams", "TargetPolicy", "client_layers", "layer_names"), "stack"),
}, globals())

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
