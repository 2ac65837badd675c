"""Pure layers stay pure: what each layer of the package may import, checked on the source itself."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import aivo_mesh
from aivo_mesh.render import TARGETS

SRC = Path(aivo_mesh.__file__).parent

# The policy layers take their own frozen parameters. policy/bind.py builds them from mesh.yaml, and
# policy/stack.py builds a target's stack from its resolved policy through bind.py: those two may read
# config/, no layer may. (policy/testing.py holds test fakes: neither.)
LAYERS = ("backoff", "balancer", "breaker", "budget", "classify", "core", "deadline", "events", "fault", "limit",
          "outlier", "ratelimit", "retry")
MAY_READ_CONFIG = ("bind", "stack")


def _imports(module: str) -> set[str]:
    """The aivo_mesh modules `module`'s source imports (any `import` statement, TYPE_CHECKING included)."""
    path = SRC.joinpath(*module.split(".")[1:])
    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aivo_mesh")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aivo_mesh"):
            # `from aivo_mesh.policy import bind` imports the module aivo_mesh.policy.bind
            found |= {f"{node.module}.{a.name}" if SRC.joinpath(*node.module.split(".")[1:], a.name).with_suffix(
                ".py").exists() else node.module for a in node.names}
    return found


def _reached(module: str) -> set[str]:
    """Every aivo_mesh module `module` imports, directly or through other aivo_mesh modules."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in _imports(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


@pytest.mark.parametrize("layer", LAYERS)
def test_policy_layers_import_nothing_from_config(layer: str) -> None:
    reached = _reached(f"aivo_mesh.policy.{layer}")
    assert not {m for m in reached if m.startswith("aivo_mesh.config")}, sorted(reached)
    assert not {f"aivo_mesh.policy.{m}" for m in MAY_READ_CONFIG} & reached, sorted(reached)


def test_every_policy_module_is_a_layer_or_named_as_a_binder() -> None:
    modules = {p.stem for p in (SRC / "policy").glob("*.py")} - {"__init__", "testing"}
    assert modules == set(LAYERS) | set(MAY_READ_CONFIG)
    for binder in MAY_READ_CONFIG:  # they do read it (else they belong in LAYERS)
        assert any(m.startswith("aivo_mesh.config") for m in _imports(f"aivo_mesh.policy.{binder}"))


# What a renderer must never load: they are pure functions of the model, run by `meshctl render` and the
# config fuzzers, with no use for a gRPC runtime, a metrics registry or a tracer.
HEAVY = ("grpc", "prometheus_client", "opentelemetry")
_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy})))
"""


@pytest.mark.parametrize("module", sorted({t.module for t in TARGETS.values()}))
def test_renderers_load_no_grpc_metrics_or_tracing(module: str) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=set(HEAVY)), module], check=True,
                         capture_output=True, text=True, cwd=SRC.parent)
    assert json.loads(out.stdout) == [], f"{module} loads {out.stdout}"


@pytest.mark.parametrize("module", sorted(p.stem for p in (SRC / "render").glob("*.py")))
def test_renderers_raise_no_config_errors(module: str) -> None:
    """A renderer is a total function of a valid model: every check is made when the mesh is loaded."""
    tree = ast.parse((SRC / "render" / f"{module}.py").read_text(encoding="utf-8"))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "ConfigError" not in names and "error" not in calls


# What `meshctl` must not load to start: every command imports what it runs (mesh.yaml's model, the PKI,
# Consul, grpc, metrics, tracing) when it runs, so `meshctl --help`, completion and `meshctl apply` do
# not pay for the others. click, rich and yaml may stay.
CLI_MUST_NOT_LOAD = ("cryptography", "pydantic", "consul", "requests", "grpc", "prometheus_client", "opentelemetry",
                     "google.protobuf")
_LOADED = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {heavy}))))
"""


def test_the_cli_starts_without_the_heavy_dependencies_of_its_commands() -> None:
    out = subprocess.run([sys.executable, "-c", _LOADED.format(heavy=set(CLI_MUST_NOT_LOAD)), "aivo_mesh.cli"],
                         check=True, capture_output=True, text=True, cwd=SRC.parent)
    assert json.loads(out.stdout) == [], f"importing aivo_mesh.cli loads {out.stdout}"


def test_what_the_cli_states_without_importing_it_agrees_with_its_source() -> None:
    """Option choices and help the CLI spells out to start light: the render targets, Consul's default agent."""
    from aivo_mesh.cli.consul_cmd import DEFAULT_AGENT
    from aivo_mesh.cli.render import TARGET_NAMES
    from aivo_mesh.discovery.consul import DEFAULT_ADDRESS

    assert tuple(TARGETS) == TARGET_NAMES
    assert DEFAULT_AGENT == DEFAULT_ADDRESS


# What `from aivo_mesh import MeshClient, MeshConfig` must not load: telemetry that is off, discovery it does
# not use, and what a client needs only once it is made (mesh.yaml's model, the certificate parser). Making a
# client loads the latter two; the import stays within a small factor of `import grpc`
# (benchmarks/bench_startup.py).
CLIENT_MUST_NOT_LOAD = ("opentelemetry", "prometheus_client", "requests", "dns", "consul", "cryptography", "pydantic",
                        "yaml")


def test_importing_the_client_loads_none_of_what_it_does_not_use() -> None:
    code = "from aivo_mesh import MeshClient, MeshConfig\n" + _LOADED.format(heavy=set(CLIENT_MUST_NOT_LOAD))
    out = subprocess.run([sys.executable, "-c", code, "aivo_mesh.services.protos"],  # and the services' protos
                         check=True, capture_output=True, text=True, cwd=SRC.parent)
    assert json.loads(out.stdout) == [], f"importing MeshClient loads {out.stdout}"
