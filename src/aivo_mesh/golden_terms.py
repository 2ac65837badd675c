"""What a golden metric counts: the status that is a success and the calls left out.

Shared by what computes golden metrics from the processes' own counters (telemetry/golden.py, for
`meshctl status`) and what queries them in Prometheus (render/grafana.py), so both mean the same
thing; a module of its own so that the renderer loads no metrics library.
"""

from __future__ import annotations

# A call that ended OK; any other status (an application error, a deadline, CIRCUIT_OPEN, LOCAL_*) failed.
SUCCESS = "OK"
# Health probes: the observer, Envoy and orchestrators probe every service, so counting them would
# make an idle service look busy and healthy.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
