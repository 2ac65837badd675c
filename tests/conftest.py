"""Shared pytest fixtures.

Sections are owned by different parts of the code base; append new sections below, clearly separated.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.pki import CertLayout, init_ca, issue_all

REPO_ROOT = Path(__file__).resolve().parents[1]

# Locating envoy, openssl, promtool, docker-compose...: skip or fail by one rule (tests/binaries.py).
pytest_plugins = ("binaries",)


# ==================================================================================================
# mesh.yaml and the mesh PKI (owner: aivo_mesh.pki)
# ==================================================================================================


@pytest.fixture(scope="session")
def mesh() -> MeshSpec:
    """The repository's mesh.yaml (read-only; modules may override this fixture)."""
    return load_mesh(REPO_ROOT / "mesh.yaml")


@pytest.fixture(scope="session")
def mesh_certs(tmp_path_factory: pytest.TempPathFactory) -> CertLayout:
    """A complete certs directory for the repository's mesh.yaml, shared by the whole session:
    root + issuing CA, and a leaf (365 days) for every service and mesh-client.

    Treat it as READ-ONLY: tests that break or rotate files must work on a copy
    (`shutil.copytree(mesh_certs.root, tmp_path / "certs")` keeps the 0600 key modes).
    """
    spec = load_mesh(REPO_ROOT / "mesh.yaml")  # not the `mesh` fixture: modules may override it
    layout = CertLayout(tmp_path_factory.mktemp("mesh-certs") / "certs")
    init_ca(layout, spec.mesh.trust_domain)
    issue_all(layout, spec)
    return layout
