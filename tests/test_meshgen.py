"""benchmarks/meshgen.py: the meshes the control-plane benchmark measures are valid and the same every time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import meshgen

from aivo_mesh.config import parse_mesh
from aivo_mesh.render.envoy import EnvoyProfile, callable_peers
from aivo_mesh.xds.resources import Trust, mesh_snapshots


@pytest.mark.parametrize("n", [1, 2, 3, 4, 40])
def test_generated_meshes_are_valid(n: int) -> None:
    mesh = parse_mesh(meshgen.mesh_yaml(n), f"meshgen-{n}.yaml")
    assert len(mesh.services) == n
    assert all(len(s.routes) == 2 for s in mesh.services)
    for name in mesh.service_names:  # each calls the services that name it as a caller: three of them
        assert callable_peers(mesh, name) == tuple(meshgen.service_name(j) for j in range(n)
                                                   if name in meshgen.callers(j, n))
        if n >= 6:
            assert len(callable_peers(mesh, name)) == 3
    profile = EnvoyProfile.local("/c", "/s")
    snapshots = mesh_snapshots(mesh, lambda m, s: profile, Trust(b"ca"))  # every sidecar's, consistent
    assert len(snapshots) == n


def test_the_same_size_gives_the_same_text_and_the_script_prints_it() -> None:
    assert meshgen.mesh_yaml(25) == meshgen.mesh_yaml(25)
    out = subprocess.run([sys.executable, str(Path(meshgen.__file__)), "25"], check=True, capture_output=True,
                         text=True)
    assert out.stdout == meshgen.mesh_yaml(25)
    bad = subprocess.run([sys.executable, str(Path(meshgen.__file__)), "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected 1 to" in bad.stderr
