"""pyproject.toml's dependencies are exactly what src/aivo_mesh imports (no more, no fewer), and the
grpc-free modules stay free of grpc."""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "aivo_mesh"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def imported_modules() -> set[str]:
    """Every absolute module name imported by the package's own code (generated stubs excluded);
    `from pkg import name` counts `pkg.name` too when that is a module (namespace packages such as
    `opentelemetry` are only resolvable to a distribution through their submodules)."""
    modules: set[str] = set()
    for path in SRC.rglob("*.py"):
        if "gen" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module)
                modules.update(f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}"))
    return {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "aivo_mesh"}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@cache
def _top_level() -> Mapping[str, list[str]]:
    return md.packages_distributions()


def distribution_of(module: str) -> str | None:
    """The distribution that installed `module`; None for a namespace package (no file of its own)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{module} is imported but not installed"
    if spec.origin is None or spec.origin == "namespace":
        return None
    origin = Path(spec.origin).resolve()
    for name in dict.fromkeys(_top_level().get(module.split(".")[0], [])):
        dist = md.distribution(name)
        root = Path(str(dist.locate_file(""))).resolve()
        owned = {f.as_posix() for f in dist.files or ()}
        if origin.is_relative_to(root) and origin.relative_to(root).as_posix() in owned:
            return str(dist.metadata["Name"]).lower().replace("_", "-")
    raise AssertionError(f"no installed distribution owns {module} ({origin})")


def test_every_imported_distribution_is_declared() -> None:
    project = _project()
    declared = {_name(r) for r in project["dependencies"]}  # type: ignore[attr-defined]
    extras = {_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}  # type: ignore[attr-defined]
    undeclared = {}
    for module in sorted(imported_modules()):
        dist = distribution_of(module)
        if dist is not None and dist not in declared | extras:
            undeclared[module] = dist
    assert undeclared == {}, "imported by src/aivo_mesh but not in pyproject.toml's dependencies"


def test_every_declared_dependency_is_imported() -> None:
    used = {distribution_of(m) for m in imported_modules()}
    declared = {_name(r) for r in _project()["dependencies"]}  # type: ignore[attr-defined]
    assert declared - used == set(), "declared in pyproject.toml but never imported by src/aivo_mesh"


def test_the_envoy_api_and_the_opentelemetry_exporter_import_together() -> None:
    # xds-protos ships old copies of opentelemetry's and googleapis' protos into their directories; make
    # runs tools/unshadow_protos.py after each install so the owners' files win. Fails when they do not.
    import subprocess
    import sys

    code = ("from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n"
            "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope\n"
            "from envoy.config.bootstrap.v3 import bootstrap_pb2\n"
            "import envoy.config.trace.v3.opentelemetry_pb2\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"run `python tools/unshadow_protos.py` (see its docstring): {done.stderr}"


# The server-call observer contract lives in policy/events.py so that these implement it without grpc:
# a StatsD-only or log-only process (and the policy core's tests) must not pay for grpc core.
@pytest.mark.parametrize("module", ["aivo_mesh.policy.events", "aivo_mesh.telemetry.metrics",
                                    "aivo_mesh.telemetry.logs", "aivo_mesh.telemetry.statsd",
                                    "aivo_mesh.telemetry.tracing"])
def test_telemetry_modules_do_not_load_grpc(module: str) -> None:
    # A fresh interpreter: this one has long imported grpc.
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env={"PYTHONPATH": str(SRC.parent), "PATH": ""})
    assert out.stdout.strip() == "[]", f"importing {module} loads grpc"
