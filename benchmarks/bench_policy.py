"""Cost of the pure policy core per call, next to the cost of an empty async call.

    .venv/bin/python benchmarks/bench_policy.py [--number 200000] [--repeat 5] [--results-dir DIR]

Cases (best of `repeat` interleaved runs of `number` calls each, real time.monotonic clock, no event loop:
the coroutines never suspend, so they are driven with `send(None)` to measure the code, not the loop):
    empty async call     `await`-free coroutine returning a prebuilt Reply (the baseline)
    decision path        deadline + breaker admit + budget deposit + pick endpoint (plain calls)
    decision + outcome   the same plus breaker.record and the endpoint's success bookkeeping
    full stack           TargetPolicy.stack_for(method) on a terminal returning OK at once:
                         deadline -> limit -> breaker -> retry -> balancer, one Call allocated per call
Prints ns/call and the ratio to the empty async call, and writes them to benchmarks/results/policy.json.
No assertions (target: decision path <= 2 us).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
import timeit
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from bench_client import RESULTS, write_results

from aivo_mesh.benchfigures import Figure
from aivo_mesh.config.model import MeshSpec
from aivo_mesh.policy.classify import SUCCESS
from aivo_mesh.policy.core import Call, Reply, monotonic
from aivo_mesh.policy.deadline import effective_timeout, inherited_timeout
from aivo_mesh.policy.stack import TargetPolicy

SERVICE = "auth-svc"
METHOD = "/aivo.auth.v1.AuthService/ValidateToken"
OK = Reply("OK", value=b"")


def mesh() -> MeshSpec:
    return MeshSpec.model_validate({"services": [{
        "name": SERVICE, "grpc_service": "aivo.auth.v1.AuthService", "port": 50051, "local_port": 50061,
        "endpoints": ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"],
        "routes": [{"match": METHOD, "timeout": "1s", "idempotent": True}],
    }]})


def drive(aw: Awaitable[Reply]) -> Reply:
    """Run a coroutine that never suspends, without an event loop."""
    coro = cast(Coroutine[Any, Any, Reply], aw)  # handlers are coroutine functions
    try:
        coro.send(None)
    except StopIteration as done:
        result: Reply = done.value
        return result
    raise RuntimeError("the coroutine suspended")


async def terminal(call: Call) -> Reply:
    return OK


def cases() -> dict[str, Callable[[], object]]:
    target = TargetPolicy.from_mesh(mesh(), SERVICE, terminal, max_retries=3)
    handler = target.stack_for(METHOD)
    params = target.params_for(METHOD)
    route_timeout = params.deadline.route_timeout
    breaker, budget, balancer = target.breaker, target.budget, target.balancer
    call = Call(SERVICE, METHOD, None, timeout=5.0)
    clock = monotonic

    def empty() -> object:
        return drive(terminal(call))

    def decision() -> object:
        now = clock()
        timeout = effective_timeout(call.timeout, route_timeout, inherited_timeout(clock))
        if timeout is not None:
            call.deadline = now + timeout
        ticket = breaker.admit()
        budget.deposit()
        ep = balancer.pick()
        return ticket, ep

    def decision_and_outcome() -> object:
        now = clock()
        timeout = effective_timeout(call.timeout, route_timeout, inherited_timeout(clock))
        if timeout is not None:
            call.deadline = now + timeout
        ticket = breaker.admit()
        budget.deposit()
        ep = balancer.pick()
        assert ep is not None
        call.endpoint = ep.address
        breaker.record(ticket, SUCCESS, "OK")
        ep.consecutive_failures = 0
        return ticket

    def full_stack() -> object:
        return drive(handler(Call(SERVICE, METHOD, None, timeout=5.0)))

    # Sanity: the stack really answers.
    assert full_stack() is OK
    return {"empty async call": empty, "decision path": decision,
            "decision + outcome": decision_and_outcome, "full stack": full_stack}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where policy.json goes")
    args = ap.parse_args(argv)
    asyncio.set_event_loop(None)  # nothing here needs a loop
    fns = cases()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm up
        timeit.timeit(fn, number=args.number // 10, timer=time.perf_counter)
    for _ in range(args.repeat):  # cases interleaved, so drift in machine speed hits them alike
        for name, fn in fns.items():
            runs[name].append(timeit.timeit(fn, number=args.number, timer=time.perf_counter) / args.number * 1e9)
    results = {name: min(ns) for name, ns in runs.items()}
    base = results["empty async call"]
    print(f"python {platform.python_version()} on {platform.machine()}; best of {args.repeat} x {args.number}")
    print(f"{'case':<22}{'ns/call':>10}{'x empty':>10}")
    for name, ns in results.items():
        print(f"{name:<22}{ns:>10.0f}{ns / base:>10.1f}")
    write_results("policy", {
        "python": platform.python_version(), "machine": platform.machine(), "number": args.number,
        "repeat": args.repeat, "ns_per_call": results, "ratio_to_empty": {n: ns / base for n, ns in results.items()},
        # Best of the repeats (the code's cost, not the machine's noise), with the repeats' range.
        "figures": [Figure("policy", f"{name}, per call", results[name], min(runs[name]), max(runs[name]), "ns",
                           target, higher_is_better=False, spread="min-max").to_dict()
                    for name, target in (("decision path", 2000.0), ("full stack", None), ("empty async call", None))],
    }, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
