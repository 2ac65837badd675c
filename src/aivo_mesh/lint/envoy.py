"""Lint Envoy bootstraps for what `envoy --mode validate` accepts but is wrong (notes/envoy.md §3, §9, §10).

`lint_bootstrap(config, file=..., check_files=...)` returns `LintIssue`s; `error`s are configurations
that silently do something else than they say (a dead timeout, a detector that never ejects, a
handshake that cannot succeed, a secret that never arrives), `warning`s are redundant or risky
settings. Checks:

- ``retry_on`` (route and virtual-host retry policies): every token must be one Envoy knows; an
  unknown token (``unknown``, ``bogus``, a typo) is ignored without a word.
- A route with ``max_stream_duration`` *and* ``timeout``: the timeout is never read (envoy#15530).
- A route with ``max_stream_duration`` whose own ``max_stream_duration`` is missing or 0s (e.g. only
  ``grpc_timeout_header_max``): route.timeout is off and calls without grpc-timeout have no deadline.
  Routes with an ``idle_timeout`` (streams) are exempt.
- ``per_try_timeout`` >= the route's deadline (``timeout``, default 15 s, or
  ``max_stream_duration.max_stream_duration``): the try timeout never fires. ``per_try_timeout`` on a
  route with ``timeout: 0s`` (how streams are rendered): it would cut the stream.
- ``circuit_breakers.thresholds[]`` with ``retry_budget`` *and* ``max_retries``: the budget wins.
- ``outlier_detection`` beside active ``health_checks`` without
  ``successful_active_health_check_uneject_host: false``: a passing check ends every ejection early.
- ``outlier_detection`` without ``common_lb_config.update_merge_window: 0s`` (warning): an ejection that
  lands within the window (default 1 s) of the previous host update, e.g. a health-check transition,
  reaches the load balancer only when the window closes, and the ejected host keeps serving meanwhile.
- ``outlier_detection`` whose ``interval`` (default 10 s) is longer than ``base_ejection_time`` (default
  30 s) (warning): Envoy returns an ejected host only at that sweep, so short ejections last up to an
  interval longer (a 1 s ejection with the default interval: up to 11 s).
- ``outlier_detection`` that can never eject: ``max_ejection_percent`` (default 10) below one host's
  share (100 / listed hosts) without ``always_eject_one_host`` (a warning for STRICT_DNS, whose name may
  resolve to more hosts); ``common_lb_config.healthy_panic_threshold`` unset (warning: at the default
  50 % Envoy routes to ejected hosts once half are out, i.e. always with one host).
- ``consecutive_gateway_failure`` set with ``enforcing_consecutive_gateway_failure`` missing or 0
  (Envoy's default 0 counts and never ejects); ``consecutive_5xx`` with
  ``enforcing_consecutive_5xx: 0`` (error) or left to the default 100 (warning: say it).
- Every TLS context: ``tls_maximum_protocol_version`` unset or below TLSv1_3 (an upstream context with
  minimum 1.3 and the client default maximum 1.2 fails every handshake, notes §10), minimum below
  TLSv1_3 (the mesh is TLS 1.3 only), a downstream context without ``require_client_certificate``
  or ALPN h2 (grpcio refuses a listener without ALPN), an upstream context that verifies nothing,
  SDS ``watched_directory`` that does not contain the files it should watch.
- ``grpc_stats`` with ``stats_for_all_methods: true`` (warning): every method name a caller sends makes
  stats of its own, without bound (Envoy's docs: safe only when every client is trusted); list the
  methods in ``individual_method_stats_allowlist`` instead.
- ``admin`` bound to anything but loopback (the admin API mutates state and is unauthenticated).
- (`lint_mesh`) a canary version that gets calls, of a service without `endpoints`, other than the
  service's own `version` (warning): discovery must find instances of it, or its calls fail.
- With ``check_files``: the SDS files named by ``path_config_source``, the secret each reference
  names (a missing one keeps the listener/cluster warming forever), every certificate, key and CA
  file inside them and inline, and the watched directories must exist.

A route is taken for a stream when it has an ``idle_timeout`` or ``timeout: 0s`` (how streams are
rendered); unary timeouts on streams shaped otherwise cannot be told apart and are not checked.
`lint_mesh(mesh)` warns about mesh.yaml retry policies the Envoy sidecars cannot express, and per-try
timeouts that do nothing (>= the route timeout) or are not applied (`config.resolve.per_try_not_applied`:
streams, non-idempotent routes, no retries, DEADLINE_EXCEEDED not retried).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from aivo_mesh.config.model import MeshSpec, ServiceSpec
from aivo_mesh.config.patterns import service_prefix
from aivo_mesh.config.resolve import (
    RoutePolicy,
    ServicePolicy,
    merge,
    per_try_not_applied,
    policy_for,
    route_policies,
    service_policy,
)
from aivo_mesh.render.envoy import VALID_RETRY_ON, retry_on_tokens

__all__ = ["LintIssue", "Severity", "lint_bootstrap", "lint_mesh", "load_config"]

Severity = Literal["error", "warning"]
DEFAULT_ROUTE_TIMEOUT = 15.0  # RouteAction.timeout when unset
DEFAULT_MAX_EJECTION_PERCENT = 10.0  # OutlierDetection.max_ejection_percent when unset
DEFAULT_OUTLIER_INTERVAL = 10.0  # OutlierDetection.interval when unset
DEFAULT_BASE_EJECTION_TIME = 30.0  # OutlierDetection.base_ejection_time when unset
_TLS_ORDER = {"TLS_AUTO": 0, "TLSv1_0": 1, "TLSv1_1": 2, "TLSv1_2": 3, "TLSv1_3": 4}


@dataclass(frozen=True)
class LintIssue:
    """One finding: `path` is where in the document (``static_resources.clusters[auth-svc]...``)."""

    path: str
    severity: Severity
    message: str

    def format(self, file: str) -> str:
        return f"{file}: {self.path or '<root>'}: {self.severity}: {self.message}"


def load_config(path: str | os.PathLike[str]) -> Any:
    """Read a bootstrap (YAML or JSON; JSON is YAML). Raises OSError or yaml.YAMLError."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


# --- walking ----------------------------------------------------------------------------------------
def _key(index: int, item: Any) -> str:
    if isinstance(item, Mapping) and isinstance(item.get("name"), str):
        return f"[{item['name']}]"
    return f"[{index}]"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every mapping in the document with its path, depth first, in document order."""
    if isinstance(node, Mapping):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}{_key(i, v)}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def _seconds(value: Any) -> float | None:
    """A protobuf Duration as written in YAML/JSON ("1.5s" or {seconds, nanos}); None if unreadable."""
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1))
    if isinstance(value, Mapping):
        try:
            return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
        except (TypeError, ValueError):
            return None
    return None


def _type_of(node: Mapping[str, Any]) -> str:
    t = node.get("@type")
    return t.rsplit(".", 1)[-1] if isinstance(t, str) else ""


# --- checks -----------------------------------------------------------------------------------------
def _check_retry_policy(path: str, policy: Mapping[str, Any], out: list[LintIssue]) -> None:
    retry_on = policy.get("retry_on")
    if retry_on is None:
        return
    if not isinstance(retry_on, str):
        out.append(LintIssue(f"{path}.retry_on", "error", "retry_on must be a comma-separated string"))
        return
    for token in (t.strip() for t in retry_on.split(",")):
        if token not in VALID_RETRY_ON:
            hint = " (gRPC has no `unknown` token, envoy#27740)" if token == "unknown" else ""
            out.append(LintIssue(f"{path}.retry_on", "error",
                                 f"unknown retry_on token {token!r}{hint}: Envoy ignores it silently; valid: "
                                 + ", ".join(sorted(VALID_RETRY_ON))))


def _check_route_action(path: str, action: Mapping[str, Any], out: list[LintIssue]) -> None:
    msd = action.get("max_stream_duration")
    if msd is not None and "timeout" in action:
        out.append(LintIssue(f"{path}.timeout", "error",
                             "route has max_stream_duration, so this timeout is never applied (envoy#15530); "
                             "put the deadline in max_stream_duration.max_stream_duration and drop timeout"))
    if msd is not None:
        deadline = _seconds(msd.get("max_stream_duration")) if isinstance(msd, Mapping) else None
        # An idle_timeout marks a stream: bounded by silence, not duration (how streams are rendered).
        if isinstance(msd, Mapping) and not deadline and "idle_timeout" not in action:
            cap = _seconds(msd.get("grpc_timeout_header_max"))
            if "grpc_timeout_header_max" not in msd:  # then Envoy does not read grpc-timeout either
                honoured = "no call has a deadline in Envoy"
            elif cap:
                honoured = f"a client's grpc-timeout is capped at {cap:g}s but a call without one has no deadline"
            else:  # 0: the header as sent, uncapped
                honoured = "a client's grpc-timeout is taken however long, and a call without one has no deadline"
            state = "missing" if msd.get("max_stream_duration") is None else f"{msd['max_stream_duration']}"
            out.append(LintIssue(f"{path}.max_stream_duration.max_stream_duration", "error",
                                 f"{state}: max_stream_duration disables route.timeout (envoy#15530), so {honoured}; "
                                 "set max_stream_duration.max_stream_duration to the route's deadline (for a "
                                 "stream, give the route an idle_timeout)"))
    else:
        raw = action.get("timeout")
        deadline = DEFAULT_ROUTE_TIMEOUT if raw is None else _seconds(raw)
    policy = action.get("retry_policy")
    per_try = _seconds(policy.get("per_try_timeout")) if isinstance(policy, Mapping) else None
    if per_try is not None and msd is None and deadline == 0:  # `timeout: 0s`: the shape of a streaming route
        out.append(LintIssue(f"{path}.retry_policy.per_try_timeout", "error",
                             f"per_try_timeout {per_try:g}s on a route without a deadline (timeout: 0s, a "
                             "stream): Envoy cuts every response still running after it, streams included"))
    elif per_try is not None and deadline and per_try >= deadline:
        out.append(LintIssue(f"{path}.retry_policy.per_try_timeout", "error",
                             f"per_try_timeout {per_try:g}s >= the route's deadline {deadline:g}s: "
                             "it never fires (and leaves no time for a retry)"))


def _check_cluster(path: str, cluster: Mapping[str, Any], out: list[LintIssue]) -> None:
    cb = cluster.get("circuit_breakers")
    thresholds = cb.get("thresholds", []) if isinstance(cb, Mapping) else []
    for i, t in enumerate(thresholds if isinstance(thresholds, list) else []):
        if isinstance(t, Mapping) and "retry_budget" in t and "max_retries" in t:
            out.append(LintIssue(f"{path}.circuit_breakers.thresholds[{i}].max_retries", "warning",
                                 "ignored: retry_budget overrides max_retries (the retry limit becomes "
                                 "min_retry_concurrency or the budget); keep one of the two"))
    od = cluster.get("outlier_detection")
    if not isinstance(od, Mapping):
        return
    odp = f"{path}.outlier_detection"
    if cluster.get("health_checks") and od.get("successful_active_health_check_uneject_host") is not False:
        out.append(LintIssue(odp, "error",
                             "active health checks with outlier detection need "
                             "successful_active_health_check_uneject_host: false, else a passing check "
                             "returns an ejected host early"))
    lb = cluster.get("common_lb_config")
    merge = lb.get("update_merge_window") if isinstance(lb, Mapping) else None
    if merge is None or _seconds(merge):
        out.append(LintIssue(f"{path}.common_lb_config.update_merge_window", "warning",
                             f"{'unset (Envoy defaults to 1s)' if merge is None else merge}: an ejection within "
                             "this window of the previous host update (e.g. a health-check transition) reaches "
                             "the load balancer only when the window closes; set 0s"))
    _check_can_eject(path, cluster, od, out)
    interval = _seconds(od["interval"]) if "interval" in od else DEFAULT_OUTLIER_INTERVAL
    base = _seconds(od["base_ejection_time"]) if "base_ejection_time" in od else DEFAULT_BASE_EJECTION_TIME
    if interval is not None and base is not None and interval > base:
        out.append(LintIssue(f"{odp}.interval", "warning",
                             f"{interval:g}s{' (unset)' if 'interval' not in od else ''} is longer than "
                             f"base_ejection_time ({base:g}s): Envoy returns an ejected host only at this "
                             f"sweep, so a {base:g}s ejection lasts up to {base + interval:g}s; set interval "
                             "<= base_ejection_time"))
    panic = lb.get("healthy_panic_threshold") if isinstance(lb, Mapping) else None
    if panic is None:
        out.append(LintIssue(f"{path}.common_lb_config.healthy_panic_threshold", "warning",
                             "unset (Envoy defaults to 50%): once half the hosts are ejected or unhealthy, "
                             "Envoy routes to all of them, ejected ones included, so the breaker does not "
                             "hold (with one host: never); set {value: 0} to fail fast instead"))
    if "consecutive_gateway_failure" in od and not od.get("enforcing_consecutive_gateway_failure"):
        out.append(LintIssue(f"{odp}.enforcing_consecutive_gateway_failure", "error",
                             "missing or 0 (Envoy's default is 0): consecutive_gateway_failure counts but "
                             "never ejects; set it to 100"))
    if "consecutive_5xx" in od:
        if "enforcing_consecutive_5xx" not in od:
            out.append(LintIssue(f"{odp}.enforcing_consecutive_5xx", "warning",
                                 "not set: relies on Envoy's default 100; state it"))
        elif not od.get("enforcing_consecutive_5xx"):
            out.append(LintIssue(f"{odp}.enforcing_consecutive_5xx", "error",
                                 "0: consecutive_5xx counts but never ejects"))


def _hosts(cluster: Mapping[str, Any]) -> int | None:
    """Endpoints listed in the cluster's load_assignment (None: none listed, e.g. EDS)."""
    la = cluster.get("load_assignment")
    groups = la.get("endpoints") if isinstance(la, Mapping) else None
    if not isinstance(groups, list):
        return None
    n = sum(len(g.get("lb_endpoints") or []) for g in groups if isinstance(g, Mapping))
    return n or None


def _check_can_eject(path: str, cluster: Mapping[str, Any], od: Mapping[str, Any], out: list[LintIssue]) -> None:
    """Envoy ejects a host only while (ejected + 1) / hosts <= max_ejection_percent, unless
    always_eject_one_host lets the first one go anyway (outlier_detection_impl.cc ejectHost)."""
    hosts = _hosts(cluster)
    if hosts is None or od.get("always_eject_one_host") is True:
        return
    raw = od.get("max_ejection_percent", DEFAULT_MAX_EJECTION_PERCENT)
    try:
        percent = float(raw["value"] if isinstance(raw, Mapping) else raw)
    except (KeyError, TypeError, ValueError):
        return
    if 100.0 / hosts <= percent:
        return
    dns = cluster.get("type") == "STRICT_DNS"  # a name may resolve to more addresses, i.e. more hosts
    out.append(LintIssue(
        f"{path}.outlier_detection.max_ejection_percent", "warning" if dns else "error",
        f"{percent:g}% of {hosts} host{'s' if hosts != 1 else ''}{' (as listed)' if dns else ''} is less than "
        "one host, so outlier detection never ejects (ejections_overflow); set always_eject_one_host: true "
        f"or max_ejection_percent >= {math.ceil(100 / hosts)}"))


def _version(params: Mapping[str, Any], key: str) -> int | None:
    v = params.get(key)
    return None if v is None else _TLS_ORDER.get(str(v), -1)


def _check_tls(path: str, ctx: Mapping[str, Any], kind: str, out: list[LintIssue]) -> None:
    common = ctx.get("common_tls_context")
    common = common if isinstance(common, Mapping) else {}
    params = common.get("tls_params")
    params = params if isinstance(params, Mapping) else {}
    pp = f"{path}.common_tls_context.tls_params"
    upstream = kind == "UpstreamTlsContext"
    lo, hi = _version(params, "tls_minimum_protocol_version"), _version(params, "tls_maximum_protocol_version")
    if hi is None or hi == 0:
        if upstream:
            out.append(LintIssue(f"{pp}.tls_maximum_protocol_version", "error",
                                 "not set: a client's default maximum is TLSv1_2, so with a TLS 1.3 peer every "
                                 "handshake fails (NO_SUPPORTED_VERSIONS_ENABLED); set TLSv1_3"))
        else:
            out.append(LintIssue(f"{pp}.tls_maximum_protocol_version", "warning",
                                 "not set: state TLSv1_3 explicitly"))
    elif hi < _TLS_ORDER["TLSv1_3"]:
        out.append(LintIssue(f"{pp}.tls_maximum_protocol_version", "error",
                             f"{params.get('tls_maximum_protocol_version')}: the mesh is TLS 1.3 only"))
    if lo is None or lo < _TLS_ORDER["TLSv1_3"]:
        out.append(LintIssue(f"{pp}.tls_minimum_protocol_version", "warning",
                             f"{params.get('tls_minimum_protocol_version', 'not set (TLSv1_2)')}: "
                             "the mesh is TLS 1.3 only"))
    if lo is not None and hi not in (None, 0) and lo > hi:
        out.append(LintIssue(pp, "error", "minimum protocol version above the maximum: no handshake can succeed"))
    if upstream:
        if not any(k in common for k in ("validation_context", "combined_validation_context",
                                         "validation_context_sds_secret_config")):
            out.append(LintIssue(f"{path}.common_tls_context", "error",
                                 "no validation context: the server certificate is not verified"))
    else:
        if ctx.get("require_client_certificate") is not True:
            out.append(LintIssue(f"{path}.require_client_certificate", "error",
                                 "not true: clients without a certificate are accepted (mTLS is optional)"))
        if "h2" not in (common.get("alpn_protocols") or []):
            out.append(LintIssue(f"{path}.common_tls_context.alpn_protocols", "error",
                                 "no h2: grpc clients refuse the connection (missing selected ALPN property)"))


def _check_grpc_stats(path: str, cfg: Mapping[str, Any], out: list[LintIssue]) -> None:
    if cfg.get("stats_for_all_methods") is True:
        out.append(LintIssue(f"{path}.stats_for_all_methods", "warning",
                             "per-method stats for every method name a caller sends grow without bound "
                             "(Envoy: safe only when every client is trusted); list the methods in "
                             "individual_method_stats_allowlist instead"))


def _check_admin(config: Mapping[str, Any], out: list[LintIssue]) -> None:
    admin = config.get("admin")
    sa = admin.get("address", {}).get("socket_address") if isinstance(admin, Mapping) else None
    if not isinstance(sa, Mapping):
        return
    host = str(sa.get("address", ""))
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        out.append(LintIssue("admin.address.socket_address.address", "error",
                             f"{host!r} is not loopback: the admin API is unauthenticated and mutates state "
                             "(expose /stats/prometheus through a listener instead)"))


def _under(path: str, directory: str) -> bool:
    d = directory.rstrip("/") + "/"
    return path.startswith(d)


def _check_watched(path: str, secret: Mapping[str, Any], out: list[LintIssue], where: str) -> None:
    """A secret's watched_directory must contain its files, else rotation never triggers a reload."""
    for key in ("tls_certificate", "validation_context"):
        body = secret.get(key)
        if not isinstance(body, Mapping):
            continue
        wd = body.get("watched_directory")
        wdir = wd.get("path") if isinstance(wd, Mapping) else None
        if not isinstance(wdir, str):
            continue
        for fpath, node in _walk(body, f"{path}.{key}"):
            fn = node.get("filename")
            if isinstance(fn, str) and not _under(fn, wdir):
                out.append(LintIssue(fpath, "warning",
                                     f"{fn} is outside watched_directory {wdir}{where}: replacing it does not "
                                     "reload the secret"))


def _missing(path: str, what: str, fn: str, out: list[LintIssue], *, directory: bool = False) -> None:
    p = Path(fn)
    ok = p.is_dir() if directory else p.is_file()
    if not ok:
        out.append(LintIssue(path, "error", f"{what} {fn} does not exist"))


def _check_files(config: Mapping[str, Any], file: str, out: list[LintIssue]) -> None:
    seen: set[tuple[str, str]] = set()
    for path, node in _walk(config):
        # SDS references: {name, sds_config: {path_config_source: {path, watched_directory}}}
        sds = node.get("sds_config")
        if isinstance(sds, Mapping):
            pcs = sds.get("path_config_source")
            sds_path = pcs.get("path") if isinstance(pcs, Mapping) else sds.get("path")
            if not isinstance(sds_path, str):
                continue
            key = (sds_path, str(node.get("name")))
            if key in seen:  # the same secret is usually named by the listener and every cluster
                continue
            seen.add(key)
            _check_sds_file(f"{path}.sds_config", str(node.get("name", "")), sds_path, file, out)
            wd = pcs.get("watched_directory") if isinstance(pcs, Mapping) else None
            if isinstance(wd, Mapping) and isinstance(wd.get("path"), str):
                _missing(f"{path}.sds_config.path_config_source.watched_directory", "watched directory",
                         wd["path"], out, directory=True)
        # Inline certificates: any DataSource `filename` inside a TLS context.
        if _type_of(node) in ("UpstreamTlsContext", "DownstreamTlsContext"):
            for fpath, inner in _walk(node, path):
                fn = inner.get("filename")
                if isinstance(fn, str):
                    _missing(f"{fpath}.filename", "file", fn, out)


def _check_sds_file(ref: str, name: str, sds_path: str, file: str, out: list[LintIssue]) -> None:
    """One SDS file and the secret `name` in it. Issues inside it are located as `<sds file>:<path>`."""
    try:
        doc = load_config(sds_path)
    except FileNotFoundError:
        out.append(LintIssue(ref, "error", f"SDS file {sds_path} does not exist"))
        return
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        out.append(LintIssue(ref, "error", f"SDS file {sds_path} cannot be read: {exc}"))
        return
    resources = doc.get("resources") if isinstance(doc, Mapping) else None
    secrets = [r for r in resources if isinstance(r, Mapping)] if isinstance(resources, list) else []
    for i, secret in enumerate(secrets):
        if secret.get("name") != name:
            continue
        inner = f"{sds_path}:resources{_key(i, secret)}"
        _check_watched(inner, secret, out, f" (secret {name!r} used by {file})")
        for fpath, node in _walk(secret, inner):
            fn = node.get("filename")
            if isinstance(fn, str):
                _missing(f"{fpath}.filename", "file", fn, out)
            wd = node.get("watched_directory")
            if isinstance(wd, Mapping) and isinstance(wd.get("path"), str):
                _missing(f"{fpath}.watched_directory", "watched directory", wd["path"], out, directory=True)
        return
    names = ", ".join(str(s.get("name")) for s in secrets) or "none"
    out.append(LintIssue(ref, "error", f"secret {name!r} is not in {sds_path} (it holds: {names}): Envoy waits "
                                       "for it forever and the listener/cluster never warms"))


def lint_bootstrap(config: Mapping[str, Any], *, file: str = "<config>", check_files: bool = False) -> list[LintIssue]:
    """Issues of one bootstrap, in document order. `file` names the bootstrap in messages about the
    files it references; `check_files` also checks that every SDS file, secret, certificate, key and
    watched directory it names exists (relative paths are taken from the current directory, as Envoy
    does)."""
    out: list[LintIssue] = []
    if not isinstance(config, Mapping):
        return [LintIssue("", "error", "not a mapping: expected an Envoy bootstrap")]
    _check_admin(config, out)
    clusters = config.get("static_resources", {}).get("clusters", []) if isinstance(
        config.get("static_resources"), Mapping) else []
    for i, cluster in enumerate(clusters if isinstance(clusters, list) else []):
        if isinstance(cluster, Mapping):
            _check_cluster(f"static_resources.clusters{_key(i, cluster)}", cluster, out)
    for path, node in _walk(config):
        kind = _type_of(node)
        if kind in ("UpstreamTlsContext", "DownstreamTlsContext"):
            _check_tls(path, node, kind, out)
        if node.get("@type") == "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig":
            _check_grpc_stats(path, node, out)
        if "match" in node and isinstance(node.get("route"), Mapping):
            _check_route_action(f"{path}.route", node["route"], out)
        if isinstance(node.get("retry_policy"), Mapping):
            _check_retry_policy(f"{path}.retry_policy", node["retry_policy"], out)
        if "tls_certificate" in node or "validation_context" in node:  # a secret (inline or static)
            _check_watched(path, node, out, "")
    if check_files:
        _check_files(config, file, out)
    return out


# How far ahead of the call grpcio starts a route's deadline (xDS max_stream_duration) on its built-in xDS
# client: measured 1 to 2 s (tests/test_xds_grpc_client.py, the conformance suite's route-deadline scenario).
GRPC_XDS_DEADLINE_EARLY = 2.0


def lint_mesh(mesh: MeshSpec, *, grpc_xds: bool = False) -> list[LintIssue]:
    """mesh.yaml retry policies the sidecars cannot express or that do nothing, and where the planes
    differ (warnings; paths as in mesh.yaml; each difference is a scenario of the conformance suite).
    With `grpc_xds`, also what gRPC's built-in xDS client (`xds:///` channels) does differently.
    A per-try timeout is left out where `per_try_not_applied` says so: warned when it was written for
    that very route (or the service's catch-all), or when the route is an idempotent unary one with
    retries whose retry_on lacks DEADLINE_EXCEEDED (probably meant to apply)."""
    out: list[LintIssue] = []
    for i, svc in enumerate(mesh.services):
        sp, policies = service_policy(mesh, svc.name), route_policies(mesh, svc.name)
        limited = svc.rate_limit is not None or any(r.rate_limit is not None for r in svc.routes)
        where = [(f"services[{i}]", service_prefix(svc.grpc_service), svc.retry)]
        where += [(f"services[{i}].routes[{j}]", r.match, r.retry) for j, r in enumerate(svc.routes)]
        if grpc_xds:
            out += _grpc_xds_service_warnings(f"services[{i}]", sp, policies)
        if (lim := svc.limits) is not None and "max_pending_requests" in lim.model_fields_set \
                and lim.max_pending_requests > 0:
            out.append(LintIssue(f"services[{i}].limits.max_pending_requests", "warning",
                                 f"{lim.max_pending_requests}: MeshClient queues up to this many calls behind "
                                 "max_requests; an Envoy sidecar (and gRPC's xDS client) refuses every call over "
                                 "max_requests at once with UNAVAILABLE, its pending queue holding only calls "
                                 "waiting for a connection"))
        for path, pattern, own in where:
            rp = policy_for(policies, pattern)
            if grpc_xds and not rp.streaming:
                if rp.timeout <= GRPC_XDS_DEADLINE_EARLY + 0.5:
                    out.append(LintIssue(f"{path}.timeout", "warning",
                                         f"{rp.timeout:g}s: gRPC's built-in xDS client (grpcio) starts a route's "
                                         "deadline 1-2 s before the call, so a deadline this short may end calls "
                                         "before they are sent"))
                if rp.retry.per_try_timeout is not None and rp.retry.max_retries > 0:
                    out.append(LintIssue(f"{path}.retry.per_try_timeout", "warning",
                                         f"{rp.retry.per_try_timeout:g}s: gRPC's built-in xDS client applies no "
                                         "per_try_timeout (gRFC A44): an attempt runs until the route's deadline"))
            written = own is not None and "per_try_timeout" in own.model_fields_set
            unfiltered = merge(sp.retry, own) if path != f"services[{i}]" else sp.retry
            why = per_try_not_applied(unfiltered, idempotent=rp.idempotent, streaming=rp.streaming)
            if why and (written or why.likely_mistake):
                out.append(LintIssue(f"{path}.retry.per_try_timeout", "warning",
                                     f"{unfiltered.per_try_timeout:g}s{'' if written else ' (inherited)'} is "
                                     f"not applied on either plane: {why}"))
            if rp.retry.max_retries == 0:
                continue
            on = retry_on_tokens(rp.retry.retry_on, idempotent=rp.idempotent, streaming=rp.streaming)
            reasons = dict(on.skipped)
            for code in on.no_envoy_token:
                out.append(LintIssue(f"{path}.retry.retry_on", "warning",
                                     f"{code}: not retried by the Envoy sidecars ({reasons[code]})"))
            if limited and "resource-exhausted" in on.tokens:
                out.append(LintIssue(f"{path}.retry.retry_on", "warning",
                                     "RESOURCE_EXHAUSTED from this service's rate limit: MeshClient retries after "
                                     "the grpc-retry-pushback-ms the limit sends, an Envoy sidecar after its own "
                                     "back-off (it does not read that trailer), into a bucket that is likely "
                                     "still empty"))
            per_try = rp.retry.per_try_timeout  # None where not applied (above)
            if per_try is not None and per_try >= rp.timeout:
                out.append(LintIssue(f"{path}.retry.per_try_timeout", "warning",
                                     f"{per_try:g}s >= the route timeout {rp.timeout:g}s: it does nothing (left "
                                     "out of the sidecar config; the proxyless attempt gets the whole deadline)"))
        out += _canary_warnings(i, svc)
    return out


def _grpc_xds_service_warnings(path: str, sp: ServicePolicy, policies: Sequence[RoutePolicy]) -> list[LintIssue]:
    """What gRPC's built-in xDS client does not apply of a service's policy (per service, not per route)."""
    out = []
    if any(rp.retry.max_retries > 0 for rp in policies):
        out.append(LintIssue(f"{path}.retry_budget", "warning",
                             f"{sp.retry_budget.percent:g} %: gRPC's built-in xDS client has no retry budget (gRFC "
                             "A44): under a failure storm every call makes all of its attempts"))
    out.append(LintIssue(f"{path}.circuit_breaker.consecutive_failures", "warning",
                         f"{sp.circuit_breaker.consecutive_failures}: gRPC's built-in xDS client neither opens a "
                         "breaker nor ejects an endpoint on consecutive failures (its outlier detection, gRFC A50, "
                         "reads success rate and failure percentage only)"))
    return out


def _canary_warnings(i: int, svc: ServiceSpec) -> list[LintIssue]:
    """Canary versions that get calls, of a service whose instances discovery finds (no `endpoints`; with them
    it is a config error): only its own `version` is known to run; the others must be registered (Consul Meta
    `version`, a `<svc>-<version>` Service), or their share of the calls fails UNAVAILABLE."""
    if svc.endpoints:
        return []
    return [LintIssue(f"services[{i}].canary.{version}", "warning",
                      f"version {version!r} gets {weight} % of the calls, but mesh.yaml lists no endpoint of it: "
                      f"discovery must find instances with version {version!r} (Consul Meta `version`, the "
                      f"`{svc.name}-{version}` Service in Kubernetes), else those calls fail UNAVAILABLE")
            for version, weight in sorted(svc.canary.items()) if weight > 0 and version != svc.version]
