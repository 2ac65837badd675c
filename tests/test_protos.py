"""The committed generated code in src/aivo_mesh/gen matches proto/ (and is importable)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from aivo_mesh.services import protos

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "src" / "aivo_mesh" / "gen"
REGEN_HINT = "generated code is stale: run `python tools/gen_protos.py` and commit src/aivo_mesh/gen"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_aivo_gen_protos", REPO / "tools" / "gen_protos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_protos() -> ModuleType:
    return _load_generator()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".pyi")
    }


def test_committed_code_is_up_to_date(gen_protos: ModuleType, tmp_path: Path) -> None:
    fresh_dir = tmp_path / "gen"
    gen_protos.generate(fresh_dir)
    fresh, committed = _tree(fresh_dir), _tree(COMMITTED)

    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    changed = sorted(name for name in set(fresh) & set(committed) if fresh[name] != committed[name])
    problems = [f"missing: {n}" for n in missing] + [f"not generated: {n}" for n in extra]
    problems += [f"differs: {n}" for n in changed]
    assert not problems, REGEN_HINT + "\n  " + "\n  ".join(problems)


def test_generation_is_deterministic_and_prunes_stale_files(gen_protos: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    gen_protos.generate(out)
    first = _tree(out)
    stale = out / "aivo" / "old" / "v1" / "old_pb2.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("# stale\n")
    gen_protos.generate(out)
    assert _tree(out) == first
    assert not (out / "aivo" / "old").exists()


def test_generated_imports_are_rerooted() -> None:
    for name, content in _tree(COMMITTED).items():
        text = content.decode("utf-8")
        assert "from aivo." not in text, f"{name}: absolute `aivo.` import left in generated code"
        assert "import aivo." not in text, f"{name}: absolute `aivo.` import left in generated code"
    assert protos.events_pb2.Event.__module__ == "aivo_mesh.gen.aivo.events.v1.events_pb2"
    assert protos.auth_pb2_grpc.__name__ == "aivo_mesh.gen.aivo.auth.v1.auth_pb2_grpc"


def test_services_are_in_the_descriptors() -> None:
    expected = {
        "auth-svc": (protos.auth_pb2, "AuthService", "aivo.auth.v1.AuthService"),
        "learner-svc": (protos.learner_pb2, "LearnerService", "aivo.learner.v1.LearnerService"),
        "event-collector-svc": (
            protos.events_pb2,
            "EventCollectorService",
            "aivo.events.v1.EventCollectorService",
        ),
        "analytics-svc": (protos.analytics_pb2, "AnalyticsService", "aivo.analytics.v1.AnalyticsService"),
    }
    assert {svc: full for svc, (_, _, full) in expected.items()} == protos.SERVICE_DESCRIPTORS
    pool = protos.auth_pb2.DESCRIPTOR.pool  # the default pool all generated modules register in
    for module, short, full in expected.values():
        assert module.DESCRIPTOR.services_by_name[short].full_name == full
        assert pool.FindServiceByName(full).full_name == full

    methods = {
        m.full_name
        for full in protos.SERVICE_DESCRIPTORS.values()
        for m in pool.FindServiceByName(full).methods
    }
    assert methods == {
        "aivo.auth.v1.AuthService.Authenticate",
        "aivo.auth.v1.AuthService.ValidateToken",
        "aivo.learner.v1.LearnerService.GetProfile",
        "aivo.learner.v1.LearnerService.UpdateProfile",
        "aivo.events.v1.EventCollectorService.Collect",
        "aivo.events.v1.EventCollectorService.CollectStream",
        "aivo.events.v1.EventCollectorService.ListEvents",
        "aivo.analytics.v1.AnalyticsService.RunReport",
    }


def test_mesh_yaml_names_the_same_grpc_services() -> None:
    mesh = yaml.safe_load((REPO / "mesh.yaml").read_text())
    declared = {s["name"]: s["grpc_service"] for s in mesh["services"]}
    assert declared == protos.SERVICE_DESCRIPTORS
