"""gRPC's own xDS client (grpcio's C-core, no sidecar, no aivo-mesh code in the caller) against the control
plane: the resources of its node group, cut from the sidecar's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from helpers import meshctl

from aivo_mesh.config import MeshSpec
from aivo_mesh.pki import CertLayout
from aivo_mesh.render.envoy import EnvoyProfile
from aivo_mesh.runtime.state import RuntimeInfo, StateDir
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from aivo_mesh.xds.proxyless import CERT_PROVIDER, METADATA_KEY, proxyless_snapshot
from aivo_mesh.xds.resources import Trust, sidecar_snapshot

ROOT = Path(__file__).resolve().parents[1]
VALIDATE = "/aivo.auth.v1.AuthService/ValidateToken"


# -- the resources, without a client ---------------------------------------------------------------------

def _unpack(any_msg: Any, message: Any) -> Any:
    assert any_msg.Unpack(message)
    return message


def test_the_proxyless_snapshot_is_the_sidecars_cut_to_what_grpc_reads(mesh: MeshSpec) -> None:
    sidecar = sidecar_snapshot(mesh, "learner-svc", EnvoyProfile.local("/certs", "/sds"), Trust(b"ca"))
    snap = proxyless_snapshot(mesh, "learner-svc", sidecar)
    peers = ["auth-svc", "event-collector-svc"]  # whom learner-svc's allow rules let it call
    for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT):
        assert sorted(snap.get(t)) == peers, t
    assert snap.get(SECRET) == {} and snap.problems() == []
    # An API listener per xds:/// target: HttpConnectionManager with the router alone, routes over ADS.
    listener = snap.get(LISTENER)["auth-svc"]
    assert isinstance(listener, listener_pb2.Listener) and not listener.filter_chains
    hcm = _unpack(listener.api_listener.api_listener, hcm_pb2.HttpConnectionManager())
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.router"]
    assert hcm.rds.route_config_name == "auth-svc" and hcm.rds.config_source.HasField("ads")
    # The peer's routes of the sidecar's outbound route configuration, byte for byte and in order.
    outbound = sidecar.get(ROUTE)["outbound"]
    assert isinstance(outbound, route_pb2.RouteConfiguration)
    mine = snap.get(ROUTE)["auth-svc"]
    assert isinstance(mine, route_pb2.RouteConfiguration)
    assert list(mine.virtual_hosts[0].routes) == [r for r in outbound.virtual_hosts[0].routes
                                                  if r.route.cluster == "auth-svc"]
    validate = mine.virtual_hosts[0].routes[0]
    assert validate.match.path == VALIDATE  # exact methods before the service's prefix
    assert validate.route.max_stream_duration.grpc_timeout_header_max.ToTimedelta().total_seconds() == 1.0
    assert validate.route.retry_policy.num_retries.value == 3
    # The cluster: what gRPC reads of the sidecar's, and mTLS through the bootstrap's certificate provider.
    cluster = snap.get(CLUSTER)["auth-svc"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    theirs = sidecar.get(CLUSTER)["auth-svc"]
    assert isinstance(theirs, cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.EDS and cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert cluster.circuit_breakers == theirs.circuit_breakers and cluster.outlier_detection == theirs.outlier_detection
    assert cluster.circuit_breakers.thresholds[0].max_requests.value == 1000
    assert not cluster.health_checks and not cluster.HasField("common_lb_config")  # Envoy's alone
    tls = _unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext())
    common = tls.common_tls_context
    assert common.tls_certificate_provider_instance.instance_name == CERT_PROVIDER
    assert common.validation_context.ca_certificate_provider_instance.instance_name == CERT_PROVIDER
    assert [m.exact for m in common.validation_context.match_subject_alt_names] == [mesh.spiffe_id("auth-svc")]
    assert not common.HasField("tls_params") and not common.tls_certificate_sds_secret_configs  # gRPC NACKs them
    unapplied = cluster.metadata.filter_metadata[METADATA_KEY]
    assert unapplied["retry_budget"]["percent"] == 25 and unapplied["retry_budget"]["window"] == "10s"
    assert unapplied["circuit_breaker"]["consecutive_failures"] == 5
    # The sidecar's endpoints, in one locality of weight 1 (gRPC drops a locality without one).
    cla = snap.get(ENDPOINT)["auth-svc"]
    sidecar_cla = sidecar.get(ENDPOINT)["auth-svc"]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    assert isinstance(sidecar_cla, endpoint_pb2.ClusterLoadAssignment)
    assert [list(loc.lb_endpoints) for loc in cla.endpoints] == [list(loc.lb_endpoints)
                                                                  for loc in sidecar_cla.endpoints]
    assert [(loc.HasField("locality"), loc.load_balancing_weight.value) for loc in cla.endpoints] == [(True, 1)]


# -- the command ------------------------------------------------------------------------------------------

def test_bootstrap_takes_the_running_control_planes_address_and_refuses_bad_input(mesh_certs: CertLayout,
                                                                                tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    shutil.copytree(mesh_certs.root, state.certs.root)
    state.mesh_file.write_text((ROOT / "mesh.yaml").read_text())
    RuntimeInfo("sidecar", "127.0.0.1:4317", control_plane={"address": "127.0.0.1:41234",
                                                           "admin": "127.0.0.1:41235"}).write(state)
    done = meshctl("xds", "bootstrap", "auth-svc", "--state-dir", str(state.root))
    assert done.returncode == 0, done.stderr
    boot = json.loads(done.stdout)
    assert boot["xds_servers"][0]["server_uri"] == "127.0.0.1:41234"
    assert boot["xds_servers"][0]["channel_creds"][0]["type"] == "tls"
    assert boot["node"] == {"id": "spiffe://aivo.local/ns/default/sa/auth-svc", "cluster": "auth-svc", "locality": {},
                            "metadata": {"aivo.plane": "proxyless", "aivo.service": "auth-svc"}}
    provider = boot["certificate_providers"][CERT_PROVIDER]
    assert provider["plugin_name"] == "file_watcher"
    assert provider["config"]["certificate_file"] == str(state.certs.identity_paths("auth-svc")[0].resolve())
    # A service mesh.yaml does not have; a service without its certificate: exit 2, saying so.
    done = meshctl("xds", "bootstrap", "billing-svc", "--state-dir", str(state.root))
    assert done.returncode == 2 and "'billing-svc' is not a service of" in done.stderr, done.stderr
    state.certs.identity_paths("analytics-svc")[1].unlink()
    done = meshctl("xds", "bootstrap", "analytics-svc", "--state-dir", str(state.root), "--file", str(tmp_path / "x"))
    assert done.returncode == 2 and "analytics-svc-key.pem: missing" in done.stderr, done.stderr
    assert not (tmp_path / "x").exists()

