"""`meshctl bench`: the benchmarks it runs, the figures it prints and records, and docs/benchmarks.md's
tables and plot, which come from the recorded runs. No timing is asserted: only what the figures say."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from aivo_mesh.benchfigures import BENCHMARKS, Figure, Run, docs_with_tables, plot_svg, read_history
from aivo_mesh.cli.bench import STEPS

ROOT = Path(__file__).resolve().parents[1]
MESHCTL = [sys.executable, "-m", "aivo_mesh"]


def test_every_benchmark_has_steps_whose_scripts_take_their_arguments() -> None:
    assert tuple(STEPS) == BENCHMARKS
    for steps in STEPS.values():
        for step in steps:
            text = (ROOT / "benchmarks" / step.script).read_text()
            for arg in (*step.args, *step.quick):
                if arg.startswith("--"):
                    assert f'"{arg}"' in text, f"{step.script} has no {arg} option"
            assert f'"{step.results}"' in text, f"{step.script} does not write {step.results}.json"
            assert "figures" in text, f"{step.script} leaves no figures for meshctl bench"


def _checkout(tmp_path: Path) -> Path:
    """A copy of the checkout's benchmarks and docs page: the runs here write their results into it."""
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("results"))
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "benchmarks.md", tmp_path / "docs" / "benchmarks.md")
    return tmp_path


def test_bench_policy_runs_the_benchmark_and_prints_its_figures(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    out = subprocess.run([*MESHCTL, "bench", "policy", "--quick", "--checkout", str(root), "-o", "json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr
    data = json.loads(out.stdout)
    assert "bench_policy.py" in out.stderr  # its progress goes to stderr, the data alone to stdout
    assert set(data) == {"date", "machine", "commit", "figures", "skipped"}
    decision = next(f for f in data["figures"] if f["name"].startswith("decision path"))
    assert decision["benchmark"] == "policy" and decision["unit"] == "ns" and decision["target"] == 2000.0
    assert decision["low"] <= decision["value"] <= decision["high"]
    assert decision["met"] is (decision["value"] <= 2000.0)
    assert out.returncode == (1 if any(f["met"] is False for f in data["figures"]) else 0)
    assert (root / "benchmarks" / "results" / "policy.json").is_file()


def _figures_file(root: Path, name: str, figures: list[Figure]) -> None:
    results = root / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps({"figures": [f.to_dict() for f in figures]}))


def test_record_appends_the_run_and_rewrites_the_tables_and_the_plot(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    met = Figure("startup", "meshctl --help", 0.15, 0.14, 0.17, "s", 0.3, higher_is_better=False)
    missed = Figure("startup", "first call of a warmed MeshClient / its steady p50", 2.5, 2.1, 2.9, "x", 2.0,
                    higher_is_better=False)
    _figures_file(root, "startup", [met])
    _figures_file(root, "first_call", [missed])
    out = subprocess.run([*MESHCTL, "bench", "startup", "--report", "--record", "--checkout", str(root)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr  # a figure misses its target
    assert "NOT met" in out.stdout and "meshctl --help" in out.stdout
    history = read_history((root / "benchmarks" / "results" / "history.jsonl").read_text())
    assert [f.name for f in history[-1].figures] == [met.name, missed.name]
    docs = (root / "docs" / "benchmarks.md").read_text()
    block = docs.split("<!-- bench:startup -->")[1].split("<!-- /bench:startup -->")[0]
    assert "| meshctl --help | 0.150 s | 0.140 s - 0.170 s (IQR) | <= 0.300 s | met |" in block
    assert "| NOT met |" in block
    svg = ET.fromstring((root / "docs" / "benchmarks.svg").read_text())
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}circle")) == 2  # one run of two figures with targets


def test_quick_runs_are_not_recorded_and_a_checkout_is_required(tmp_path: Path) -> None:
    out = subprocess.run([*MESHCTL, "bench", "policy", "--quick", "--record", "--checkout", str(ROOT)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "too short to record" in out.stderr
    out = subprocess.run([*MESHCTL, "bench", "policy", "--report"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    if out.returncode in (0, 1):  # an editable install finds its own checkout from anywhere
        import aivo_mesh

        assert (Path(str(aivo_mesh.__file__)).resolve().parents[2] / "benchmarks").is_dir()
    else:
        assert out.returncode == 2 and "no benchmarks/ folder" in out.stderr, out.stderr


def test_a_figure_meets_its_target_in_the_direction_that_is_better() -> None:
    faster = Figure("client", "x", 1.07, 1.0, 1.1, "x", 1.05)
    slower = Figure("client", "x", 1.02, 1.0, 1.1, "x", 1.05)
    quick = Figure("startup", "t", 0.2, 0.1, 0.3, "s", 0.3, higher_is_better=False)
    assert faster.met and not slower.met and quick.met
    assert Figure("policy", "n", 5.0, 4.0, 6.0, "ns").met is None
    assert quick.score == pytest.approx(1.5) and slower.score == pytest.approx(1.02 / 1.05)


def test_the_tables_need_their_markers() -> None:
    with pytest.raises(ValueError, match="bench:client"):
        docs_with_tables("# Benchmarks\n", [])


def test_the_plot_is_the_same_for_the_same_history_and_shows_each_recorded_run() -> None:
    runs = [Run(f"2026-12-0{i}T00:00:00+00:00", "m", "c", (
        Figure("client", "shipped", 1.0 + i / 100, 0.9, 1.1, "x", 1.05),
        Figure("policy", "no target", 1.0, 1.0, 1.0, "ns"))) for i in range(1, 4)]
    svg = plot_svg(runs)
    assert svg == plot_svg(runs)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f".//{ns}circle")) == 3  # three runs of the one figure with a target
    assert [t.text for t in root.findall(f".//{ns}text") if t.get("class") == "figure"] == ["client: shipped"]


def test_the_checked_in_tables_and_plot_are_those_of_the_recorded_runs() -> None:
    """docs/benchmarks.md's tables and docs/benchmarks.svg are written by `meshctl bench --record` from
    benchmarks/results/history.jsonl: edited by hand, or left behind by a newer run, they fail here."""
    history_file = ROOT / "benchmarks" / "results" / "history.jsonl"
    history = read_history(history_file.read_text())
    assert history, "no recorded run"
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert docs_with_tables(docs, history) == docs
    assert (ROOT / "docs" / "benchmarks.svg").read_text() == plot_svg(history)
    for benchmark in BENCHMARKS:
        assert re.search(rf"<!-- bench:{benchmark} -->\nMeasured ", docs), f"no recorded run of {benchmark}"


def test_a_step_whose_program_is_missing_is_skipped_with_the_reason(tmp_path: Path) -> None:
    """Without valgrind on PATH the instruction count is skipped, said so, and the rest still reported."""
    root = _checkout(tmp_path)
    _figures_file(root, "sidecar", [Figure("sidecar", "rendered / minimal", 1.0, 0.9, 1.1, "x", 0.95)])
    bare = tmp_path / "bin"
    bare.mkdir()
    out = subprocess.run([*MESHCTL, "bench", "sidecar", "--report", "--checkout", str(root), "-o", "json"],
                         capture_output=True, text=True, timeout=60, env={"PATH": str(bare), "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"benchmark": "sidecar", "script": "count_envoy_instructions.py",
            "reason": "valgrind is not installed"} in data["skipped"]
    envoy_skipped = {"benchmark": "sidecar", "script": "bench_sidecar.py",
                     "reason": "envoy is not installed"} in data["skipped"]  # the envoy extra is optional
    assert [f["name"] for f in data["figures"]] == ([] if envoy_skipped else ["rendered / minimal"])
