"""What docs/benchmarks.md says about the benchmark scripts and the tests, and what .ci/run runs, checked."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = (ROOT / "docs" / "benchmarks.md").read_text()
# An assertion on a duration measured by the test itself: `monotonic() - start`, or a variable `elapsed`.
ELAPSED = re.compile(r"(monotonic|perf_counter)\(\) - |\belapsed\b")


def _timing_asserts() -> list[str]:
    """`file::test` once per assertion that bounds elapsed wall-clock time."""
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.name.startswith("test_"):
                found += [f"{path.name}::{fn.name}" for node in ast.walk(fn)
                          if isinstance(node, ast.Assert) and ELAPSED.search(ast.unparse(node.test))]
    return found


def test_the_tests_that_bound_elapsed_time_are_the_ones_docs_benchmarks_lists() -> None:
    section = BENCHMARKS.split("### Tests that bound elapsed time", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([\w.]+::\w+)`", section, flags=re.MULTILINE)
    found = _timing_asserts()
    assert sorted(set(found)) == sorted(listed), "docs/benchmarks.md: list each test that bounds elapsed time"
    words = {"Five": 5, "Six": 6, "Seven": 7, "Eight": 8, "Nine": 9, "Ten": 10}
    claimed = re.search(r"^(\w+) assertions bound elapsed time", section, flags=re.MULTILINE)
    assert claimed and words.get(claimed.group(1)) == len(found), (claimed, len(found))


def test_every_benchmark_script_writes_its_summary(tmp_path: Path) -> None:
    scripts = re.findall(r"^\| `benchmarks/(\w+\.py)` \|", BENCHMARKS, flags=re.MULTILINE)
    present = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name.startswith(("bench_", "count_")))
    assert sorted(scripts) == present, "docs/benchmarks.md lists every benchmark script, once"
    for name in scripts:
        calls = [n for n in ast.walk(ast.parse((ROOT / "benchmarks" / name).read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "write_results"]
        assert calls, f"{name} does not write benchmarks/results/<name>.json"
    # The one in-process script, run for real (briefly): it leaves its summary behind.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_policy.py"), "--number", "500",
                           "--repeat", "1", "--results-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "policy.json").read_text())
    assert set(summary["ns_per_call"]) == {"empty async call", "decision path", "decision + outcome", "full stack"}
    assert all(ns > 0 for ns in summary["ns_per_call"].values())


def test_ci_runs_make_lint_then_make_test_with_ci_set(tmp_path: Path) -> None:
    """.ci/run with a `make` that records its calls, and no apt-get on PATH (so nothing is installed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "make.log"
    (bin_dir / "make").write_text(f'#!/bin/sh\necho "$* CI=$CI" >> {log}\n')
    (bin_dir / "make").chmod(0o755)
    for tool in ("id", "dirname"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PATH": str(bin_dir)}
    done = subprocess.run(["/bin/bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert log.read_text().splitlines() == ["lint CI=true", "test CI=true"]
