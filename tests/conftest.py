"""Shared pytest fixtures.

Sections are owned by different parts of the code base; append new sections below, clearly separated.
"""

from __future__ import annotations

import os
import random
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import is_hypothesis_test

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


# ==================================================================================================
# Hypothesis: one seed per run, shown, so whatever the fuzzers find can be found again
# ==================================================================================================


CI_HYPOTHESIS_SEED = "20261206"


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's own plugin reads --hypothesis-seed
def pytest_configure(config: pytest.Config) -> None:
    # A fresh seed each run keeps the fuzzers exploring on developer machines; naming it makes a failure
    # reproducible where the example database (.hypothesis/) is not kept. CI uses one fixed seed: a
    # submission must not pass or fail by the luck of the draw (what a fresh seed finds locally is
    # fixed, then kept as a test).
    if config.getoption("hypothesis_seed", None) is None:
        in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
        config.option.hypothesis_seed = CI_HYPOTHESIS_SEED if in_ci else str(random.SystemRandom().randrange(2**32))


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.getoption("hypothesis_seed")
    return f"hypothesis seed {seed}: rerun with --hypothesis-seed={seed} to replay the fuzzers' inputs"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed and is_hypothesis_test(getattr(item, "obj", None)):
        seed = item.config.getoption("hypothesis_seed")
        report.sections.append(("hypothesis seed", f"reproduce with: pytest --hypothesis-seed={seed} {item.nodeid}"))
    return report
