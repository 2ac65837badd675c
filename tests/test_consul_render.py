"""Consul renderer (agent config files) and `meshctl consul register|deregister|services` against
the in-repo fake agent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes.consul_agent import FakeConsulAgent, go_duration

from aivo_mesh.cli import main
from aivo_mesh.config.loader import load_mesh
from aivo_mesh.discovery.consul_register import agent_service_definition
from aivo_mesh.render import consul, render_target

ROOT = Path(__file__).resolve().parents[1]
MESH = load_mesh(ROOT / "mesh.yaml")


def rendered() -> dict[str, dict[str, Any]]:
    return {p: json.loads(t) for p, t in render_target("consul", MESH).items()}


def test_one_agent_config_file_per_service_wrapping_the_registration_body():
    files = rendered()
    assert set(files) == {"agent.json", *(f"{s}.json" for s in MESH.service_names)}
    for svc in MESH.services:
        body = files[f"{svc.name}.json"]
        assert list(body) == ["service"]
        # exactly what the service would PUT to /v1/agent/service/register from its pod
        assert body["service"] == agent_service_definition(MESH, svc.name, svc.name, 50051)


def test_definitions_address_the_pod_and_check_grpc_health_over_tls():
    d = rendered()["auth-svc.json"]["service"]
    assert d["Name"] == "auth-svc"
    assert d["ID"] == "auth-svc-auth-svc-50051"
    assert (d["Address"], d["Port"]) == ("auth-svc", 50051)
    assert d["Tags"] == ["auth", "tier-1"]
    assert d["Meta"] == {"version": "1.0.0", "team": "identity"}
    check = d["Check"]
    assert check["GRPC"] == "auth-svc:50051/aivo.auth.v1.AuthService"
    assert check["GRPCUseTLS"] is True
    assert check["TLSServerName"] == "auth-svc"
    assert check["TLSSkipVerify"] is False
    assert check["Interval"] == "30s"
    assert check["Timeout"] == "5s"
    assert go_duration(check["DeregisterCriticalServiceAfter"]) >= 60


def test_agent_tls_uses_the_mesh_client_identity_from_the_pki_layout():
    tls = rendered()["agent.json"]["tls"]["defaults"]
    assert tls["ca_file"].endswith("/ca/ca.crt")
    assert tls["cert_file"].endswith("/mesh-client.crt")
    assert tls["key_file"].endswith("/mesh-client-key.pem")


def test_the_fake_agent_accepts_every_rendered_definition():
    with FakeConsulAgent() as agent:
        import requests

        for name, body in rendered().items():
            if name == "agent.json":
                continue
            resp = requests.put(f"http://{agent.address}/v1/agent/service/register",
                                data=json.dumps(body["service"]), timeout=5)
            assert resp.status_code == 200, resp.text
        assert set(agent.registrations) == {f"{s}-{s}-50051" for s in MESH.service_names}


def test_rendering_is_deterministic():
    assert render_target("consul", MESH) == render_target("consul", load_mesh(ROOT / "mesh.yaml"))
    assert consul.service_definition(MESH, MESH.service("auth-svc"), address="10.0.0.5", port=50061)[
        "service"]["Check"]["GRPC"] == "10.0.0.5:50061/aivo.auth.v1.AuthService"


# -- meshctl consul --------------------------------------------------------------------------------

@pytest.fixture
def agent():
    with FakeConsulAgent() as fake:
        yield fake


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_register_every_service_then_list_and_deregister_one(agent, capsys):
    cfg = str(ROOT / "mesh.yaml")
    code, out, err = run(capsys, "consul", "register", "--config", cfg, "--consul", agent.address)
    assert code == 0, err
    ids = {f"{s.name}-127.0.0.1-{s.port}" for s in MESH.services}
    assert set(agent.registrations) == ids
    for line in ("registered auth-svc-127.0.0.1-50051 (auth-svc at 127.0.0.1:50051)",):
        assert line in out
    assert agent.register_params["auth-svc-127.0.0.1-50051"]["replace-existing-checks"] == ["true"]
    check = agent.registrations["auth-svc-127.0.0.1-50051"]["Check"]
    assert (check["GRPCUseTLS"], check["TLSServerName"]) == (True, "auth-svc")

    code, out, _ = run(capsys, "consul", "services", "--consul", agent.address, "-o", "json")
    assert code == 0
    listing = json.loads(out)
    assert listing["agent"] == agent.address
    tags = {s["name"]: s["tags"] for s in listing["services"]}
    assert set(tags) >= set(MESH.service_names)
    assert tags["auth-svc"] == ["auth", "tier-1"]
    code, out, _ = run(capsys, "consul", "services", "--consul", agent.address, "-o", "yaml")
    assert code == 0
    assert yaml.safe_load(out) == listing

    code, out, _ = run(capsys, "consul", "deregister", "auth-svc", "--consul", agent.address)
    assert code == 0
    assert "deregistered auth-svc-127.0.0.1-50051" in out
    assert "auth-svc-127.0.0.1-50051" not in agent.registrations
    assert len(agent.registrations) == 3

    code, out, _ = run(capsys, "consul", "services", "--consul", agent.address)
    assert code == 0
    assert "auth-svc" not in out
    assert "learner-svc" in out


def test_register_one_service_at_an_address_without_tls(agent, capsys):
    code, _, err = run(capsys, "consul", "register", "event-collector-svc", "--config", str(ROOT / "mesh.yaml"),
                         "--consul", agent.address, "--address", "10.0.0.7", "--port", "50063", "--no-tls")
    assert code == 0, err
    (body,) = agent.registrations.values()
    assert body["ID"] == "event-collector-svc-10.0.0.7-50063"
    assert body["Check"]["GRPC"] == "10.0.0.7:50063/aivo.events.v1.EventCollectorService"
    assert body["Check"]["GRPCUseTLS"] is False
    assert "TLSServerName" not in body["Check"]


def test_cli_errors_are_messages_not_tracebacks(agent, capsys):
    cfg = str(ROOT / "mesh.yaml")
    code, _, err = run(capsys, "consul", "register", "nope-svc", "--config", cfg, "--consul", agent.address)
    assert code == 2
    assert "unknown service 'nope-svc'" in err
    code, _, err = run(capsys, "consul", "register", "--config", cfg, "--port", "1234", "--consul", agent.address)
    assert code == 2
    assert "--port applies to one service" in err
    code, _, err = run(capsys, "consul", "deregister", "auth-svc", "--consul", agent.address)
    assert code == 1
    assert "no instance of auth-svc is registered" in err
    code, _, err = run(capsys, "consul", "deregister", "--id", "ghost-1", "--consul", agent.address)
    assert code == 1
    assert "unknown service ID ghost-1" in err
    agent.fail_next(1, 500, "rpc error: boom")
    code, _, err = run(capsys, "consul", "register", "auth-svc", "--config", cfg, "--consul", agent.address)
    assert code == 1
    assert "register auth-svc-127.0.0.1-50051 failed" in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "consul", "services", "--consul", "127.0.0.1:1")
    assert code == 1
    assert "list services failed" in err


def test_token_is_sent_to_an_acl_agent(capsys):
    with FakeConsulAgent(acl_token="s3cret") as agent:
        code, _, _ = run(capsys, "consul", "services", "--consul", agent.address)
        assert code == 1  # 403 without the token
        code, out, _ = run(capsys, "consul", "services", "--consul", agent.address, "--token", "s3cret")
        assert code == 0
        assert "consul" in out
