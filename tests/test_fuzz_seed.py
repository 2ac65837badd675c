"""The Hypothesis fuzzers run on a fresh seed each time, and name it: a failure they find reproduces."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
pytest_plugins = ("pytester",)

FUZZ = """
import os

from hypothesis import given, settings, strategies as st


@given(st.integers())
@settings(max_examples=30, database=None)
def test_record(x):
    with open(os.environ["FUZZ_LOG"], "a") as f:
        f.write(f"{x}\\n")


@given(st.integers(0, 10**9))
@settings(max_examples=100, database=None)
def test_fails(x):
    assert x < 10**6
"""


def test_a_run_names_its_seed_and_the_seed_replays_the_same_inputs(pytester: pytest.Pytester,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest((TESTS / "conftest.py").read_text())  # the suite's own hooks
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_fuzz=FUZZ)

    def run(log: str, *args: str) -> tuple[pytest.RunResult, list[str]]:
        monkeypatch.setenv("FUZZ_LOG", str(pytester.path / log))
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
        return result, (pytester.path / log).read_text().splitlines()

    first, inputs = run("first.log")
    first.assert_outcomes(passed=1, failed=1)
    header = re.search(r"hypothesis seed (\d+): rerun with --hypothesis-seed=\1", first.stdout.str())
    assert header, first.stdout.str()
    seed = header.group(1)
    first.stdout.fnmatch_lines([f"*reproduce with: pytest --hypothesis-seed={seed} test_fuzz.py::test_fails*"])
    again, replayed = run("again.log", f"--hypothesis-seed={seed}", "-k", "test_record")
    again.assert_outcomes(passed=1)
    assert replayed == inputs and len(set(inputs)) > 5
    assert f"hypothesis seed {seed}:" in again.stdout.str()  # a seed given is the one shown


def test_ci_runs_the_fuzzers_on_one_fixed_seed(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # A submission must not pass or fail CI by the luck of a fresh seed.
    from conftest import CI_HYPOTHESIS_SEED

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_fuzz=FUZZ)
    monkeypatch.setenv("FUZZ_LOG", str(pytester.path / "ci.log"))
    for ci in ("true", "1"):
        monkeypatch.setenv("CI", ci)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "test_record")
        assert f"hypothesis seed {CI_HYPOTHESIS_SEED}:" in result.stdout.str()
