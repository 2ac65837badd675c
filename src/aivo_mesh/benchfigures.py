"""Benchmark figures: what `meshctl bench` prints and records, and what docs/benchmarks.md shows.

Each benchmark script (benchmarks/) leaves its results in benchmarks/results/<name>.json, with a
`figures` list: each figure a ratio against a baseline measured in the same run (or a plain measure),
its spread over the rounds, and the project's target where it sets one. A recorded run (`meshctl bench
--record`) is one line of benchmarks/results/history.jsonl: date, machine, commit and figures. From the
history come docs/benchmarks.md's tables (the latest run of each benchmark) and its plot (the latest
runs of every figure with a target). Pure functions: reading and writing files is the command's job.
"""

from __future__ import annotations

import html
import json
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

BENCHMARKS = ("client", "sidecar", "policy", "scale", "startup")

# How many recorded runs of each figure the plot shows.
PLOT_RUNS = 8


@dataclass(frozen=True, slots=True)
class Figure:
    """One figure of one benchmark run."""

    benchmark: str  # one of BENCHMARKS
    name: str  # what is measured, and against what
    value: float
    low: float  # the spread of the rounds around `value` (`spread` says which)
    high: float
    unit: str  # "x" for a ratio, else "s", "ms", "us", "ns" or "instructions"
    target: float | None = None
    higher_is_better: bool = True
    spread: str = "IQR"  # "IQR" (quartiles of per-round figures), "min-max", or "-" (one exact count)

    @property
    def met(self) -> bool | None:
        """Whether the figure meets its target (None: it has none)."""
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    @property
    def score(self) -> float | None:
        """The figure over its target, oriented so that >= 1 meets it (the plot's axis)."""
        return None if self.target is None else self.scored(self.value)

    def scored(self, x: float) -> float:
        """`x` (the value, or an end of its spread) over the target, oriented as `score`."""
        assert self.target is not None
        return x / self.target if self.higher_is_better else self.target / max(x, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Figure:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def from_rounds(benchmark: str, name: str, per_round: Sequence[float], *, target: float | None = None,
          higher_is_better: bool = True, unit: str = "x") -> Figure:
    """A figure from per-round values: their median, with the interquartile range."""
    xs = sorted(per_round)
    if len(xs) > 1:
        q = statistics.quantiles(xs, n=4)
        low, high = q[0], q[2]
    else:
        low = high = xs[0]
    return Figure(benchmark, name, statistics.median(xs), low, high, unit, target, higher_is_better)


@dataclass(frozen=True, slots=True)
class Run:
    """One recorded `meshctl bench` run."""

    date: str  # ISO 8601, UTC
    machine: str
    commit: str
    figures: tuple[Figure, ...] = field(default=())

    def to_json(self) -> str:
        return json.dumps({"date": self.date, "machine": self.machine, "commit": self.commit,
                           "figures": [f.to_dict() for f in self.figures]}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Run:
        data = json.loads(line)
        return cls(data["date"], data["machine"], data["commit"],
                   tuple(Figure.from_dict(f) for f in data["figures"]))


def read_history(text: str) -> list[Run]:
    return [Run.from_json(line) for line in text.splitlines() if line.strip()]


def latest(history: Sequence[Run], benchmark: str) -> tuple[Run, tuple[Figure, ...]] | None:
    """The newest run that measured `benchmark`, and its figures of it."""
    for run in reversed(history):
        figures = tuple(f for f in run.figures if f.benchmark == benchmark)
        if figures:
            return run, figures
    return None


def _number(x: float, unit: str) -> str:
    if unit == "x":
        return f"{x:.3f}x"
    if unit == "instructions":
        return f"{x:,.0f}"
    digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2 if abs(x) >= 1 else 3
    return f"{x:.{digits}f} {unit}"


def describe(f: Figure) -> dict[str, str]:
    """A figure's cells, as the table and the text output print them."""
    spread = "" if f.spread == "-" else f"{_number(f.low, f.unit)} - {_number(f.high, f.unit)} ({f.spread})"
    target = "" if f.target is None else f"{'>=' if f.higher_is_better else '<='} {_number(f.target, f.unit)}"
    met = {True: "met", False: "NOT met", None: ""}[f.met]
    return {"figure": f.name, "value": _number(f.value, f.unit), "spread": spread, "target": target, "met": met}


def markdown_table(run: Run, figures: Iterable[Figure], benchmark: str) -> str:
    lines = [f"Measured {run.date[:10]} on {run.machine} (commit {run.commit[:10]}) by `meshctl bench {benchmark}`:",
             "", "| figure | value | spread | target | |", "|---|---:|---:|---:|---|"]
    for f in figures:
        d = describe(f)
        lines.append(f"| {d['figure']} | {d['value']} | {d['spread']} | {d['target']} | {d['met']} |")
    return "\n".join(lines)


def _marker(benchmark: str) -> tuple[str, str]:
    return f"<!-- bench:{benchmark} -->", f"<!-- /bench:{benchmark} -->"


def docs_with_tables(text: str, history: Sequence[Run]) -> str:
    """`text` (docs/benchmarks.md) with each benchmark's table block replaced by its latest recorded run.
    ValueError if a benchmark's markers are missing."""
    for benchmark in BENCHMARKS:
        start, end = _marker(benchmark)
        m = re.search(re.escape(start) + r".*?" + re.escape(end), text, re.S)
        if m is None:
            raise ValueError(f"no {start} ... {end} block: where should {benchmark}'s table go?")
        found = latest(history, benchmark)
        body = (markdown_table(*found, benchmark) if found
                else f"No recorded run yet: `meshctl bench {benchmark} --record`.")
        text = f"{text[:m.start()]}{start}\n{body}\n{end}{text[m.end():]}"
    return text


# The plot's x axis: the figure over its target, linear between these (a figure beyond is drawn at the
# edge, with its value): near the target is where a run's spread decides.
PLOT_RANGE = (0.6, 1.6)


def plot_svg(history: Sequence[Run], runs: int = PLOT_RUNS) -> str:
    """The latest `runs` recorded values of every figure with a target, as a dot plot: one row per figure,
    the figure over its target on the x axis (1.0, the target line; right of it, met), each run a dot
    (the newest darkest) with its spread as a bar. Deterministic: the same history, the same bytes."""
    series: dict[tuple[str, str], list[Figure]] = {}
    for run in history:
        for f in run.figures:
            if f.target is not None:
                series.setdefault((f.benchmark, f.name), []).append(f)
    order = {b: i for i, b in enumerate(BENCHMARKS)}
    rows = [(key, figs[-runs:]) for key, figs in sorted(series.items(), key=lambda kv: order.get(kv[0][0], 99))]
    lo, hi = PLOT_RANGE
    label_w, plot_w, row_h, top = 660, 400, 24, 44
    width, height = label_w + plot_w + 40, top + row_h * max(len(rows), 1) + 36

    def x(score: float) -> float:
        return label_w + (min(max(score, lo), hi) - lo) / (hi - lo) * plot_w

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           '<text x="10" y="20" font-size="13" font-weight="bold">The latest recorded runs, each figure over its '
           'target (right of the line: met; newest darkest, bars: spread)</text>']
    for i in range(round((hi - lo) * 10) + 1):
        tick = lo + i / 10
        tx = x(tick)
        colour = "#333" if abs(tick - 1.0) < 1e-9 else "#e4e4e4"
        out.append(f'<line x1="{tx:.1f}" y1="{top - 10}" x2="{tx:.1f}" y2="{height - 26}" stroke="{colour}"/>')
        if i % 2 == 0:
            out.append(f'<text x="{tx:.1f}" y="{height - 12}" text-anchor="middle">{tick:.1f}</text>')
    for i, ((benchmark, name), figs) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        out.append(f'<text class="figure" x="10" y="{y + 4:.1f}">{html.escape(f"{benchmark}: {name}")}</text>')
        for j, f in enumerate(figs):
            shade = int(190 - 190 * (j + 1) / len(figs))
            colour = f"rgb({shade},{shade},{shade})" if f.met else f"rgb(215,{shade // 3},{shade // 3})"
            a, b = sorted((f.scored(f.low), f.scored(f.high)))
            score = f.score or 0.0
            out.append(f'<line x1="{x(a):.1f}" y1="{y:.1f}" x2="{x(b):.1f}" y2="{y:.1f}" stroke="{colour}" '
                       'stroke-width="2"/>')
            out.append(f'<circle class="run" cx="{x(score):.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
            if j == len(figs) - 1 and not lo <= score <= hi:  # off the axis: say where
                out.append(f'<text x="{x(score) + (8 if score > hi else -8):.1f}" y="{y + 4:.1f}" '
                           f'text-anchor="{"start" if score > hi else "end"}">{score:.1f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
