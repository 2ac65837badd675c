"""`-o text|json|yaml` of every meshctl command that prints data, and `render --output-dir -`.

Each data command is run with `-o json` and `-o yaml`: both parse, to the same structure, and its keys
do not depend on the state found (a mesh with spans or without, good certificates or bad ones).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from aivo_mesh.cli import main
from aivo_mesh.cli._output import FORMATS
from aivo_mesh.cli._root import cli
from aivo_mesh.pki import CertLayout
from aivo_mesh.render import render_target
from aivo_mesh.runtime.collector import SpanLog
from aivo_mesh.telemetry.otlp_receiver import SpanRecord

ROOT = Path(__file__).resolve().parents[1]
MESH_FILE = str(ROOT / "mesh.yaml")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    found: dict[tuple[str, ...], click.Command] = {}
    for name, cmd in group.commands.items():
        found[(*prefix, name)] = cmd
        if isinstance(cmd, click.Group):
            found.update(_commands(cmd, (*prefix, name)))
    return found


# The commands that print data (tables, listings, findings). The others print what they did.
DATA_COMMANDS = {("certs", "init"), ("certs", "issue"), ("certs", "verify"), ("certs", "inspect"),
                 ("certs", "rotate"), ("config", "validate"), ("config", "show"), ("status",), ("routes",),
                 ("edges",), ("traces",), ("consul", "services"), ("lint",), ("check",), ("apply",), ("config-dump",),
                 ("conformance",), ("bench",)}


def test_o_means_the_output_format_in_every_command_and_every_data_command_has_it() -> None:
    with_o = set()
    for path, cmd in _commands(cli).items():
        for p in cmd.params:
            if "-o" in getattr(p, "opts", []):
                assert p.name == "output", f"meshctl {' '.join(path)}: -o is --{p.name}"
                assert isinstance(p.type, click.Choice) and tuple(p.type.choices) == FORMATS
                with_o.add(path)
    assert with_o == DATA_COMMANDS


@pytest.fixture
def certs(mesh_certs: CertLayout, tmp_path: Path) -> CertLayout:
    shutil.copytree(mesh_certs.root, tmp_path / "certs")
    return CertLayout(tmp_path / "certs")


def _span(trace_id: str, span_id: str, parent: str, service: str, status: str = "UNSET") -> SpanRecord:
    now = time.time_ns()
    return SpanRecord(trace_id=trace_id, span_id=span_id, parent_span_id=parent,
                      name="/aivo.auth.v1.AuthService/ValidateToken", kind="SERVER", service=service,
                      start_ns=now, end_ns=now + 2_000_000, status=status, attributes={"rpc.system": "grpc"},
                      events=("message",))


def _data(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> Any:
    """The command's data, from -o json and -o yaml (which must agree)."""
    got, out, err = _run(capsys, *argv, "-o", "json")
    assert got == code, err
    as_json = json.loads(out)
    got, out, err = _run(capsys, *argv, "-o", "yaml")
    assert got == code, err
    as_yaml = yaml.safe_load(out)
    volatile = {"observed_at", "generated_at"}  # a timestamp of each run
    assert {k: v for k, v in as_yaml.items() if k not in volatile} == \
           {k: v for k, v in as_json.items() if k not in volatile}
    return as_json


def _same_shape(a: Any, b: Any) -> None:
    """The same keys at every level (the first item of lists stands for all)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (sorted(a), sorted(b) if isinstance(b, dict) else b)
        for k in a:
            if a[k] is not None and b[k] is not None:
                _same_shape(a[k], b[k])
    elif isinstance(a, list) and a and b:
        _same_shape(a[0], b[0])


Setup = Callable[[Path, CertLayout], tuple[list[str], list[str], int]]


def _certs_verify(tmp: Path, certs: CertLayout) -> tuple[list[str], list[str], int]:
    argv = ["certs", "verify", "-d", str(certs.root), "--config", MESH_FILE]
    return argv, argv, 0


def _certs_inspect(tmp: Path, certs: CertLayout) -> tuple[list[str], list[str], int]:
    argv = ["certs", "inspect", "-d", str(certs.root)]
    return argv, argv, 0


def _traces(tmp: Path, certs: CertLayout) -> tuple[list[str], list[str], int]:
    (tmp / "empty").mkdir()
    full = tmp / "full"
    full.mkdir()
    SpanLog(full / "traces.jsonl").append([_span("ab" * 16, "01" * 8, "", "learner-svc"),
                                          _span("ab" * 16, "02" * 8, "01" * 8, "auth-svc", "ERROR")])
    return ["traces", "--state-dir", str(tmp / "empty")], ["traces", "--state-dir", str(full)], 0


def _status(tmp: Path, certs: CertLayout) -> tuple[list[str], list[str], int]:
    argv = ["status", "--state-dir", str(tmp / "state"), "--interval", "0"]
    return argv, argv, 0


def _config_show(tmp: Path, certs: CertLayout) -> tuple[list[str], list[str], int]:
    return ["config", "show", MESH_FILE], ["config", "show", MESH_FILE], 0


def _config_validate(tmp: Path, certs: CertLayout) -> tuple[list[str], list[str], int]:
    return ["config", "validate", MESH_FILE], ["config", "validate", MESH_FILE], 0


def _lint(tmp: Path, certs: CertLayout) -> tuple[list[str], list[str], int]:
    return ["lint", "--config", MESH_FILE], ["lint", "--config", MESH_FILE], 0


def _check(tmp: Path, certs: CertLayout) -> tuple[list[str], list[str], int]:
    argv = ["check", "--config", MESH_FILE, "-d", str(certs.root), "--state-dir", str(tmp / "state")]
    return argv, argv, 0


@pytest.mark.parametrize("setup", [_certs_verify, _certs_inspect, _traces, _status, _config_show,
                                   _config_validate, _lint, _check], ids=lambda f: f.__name__.strip("_"))
def test_data_commands_print_json_and_yaml_of_one_structure(
        setup: Setup, tmp_path: Path, certs: CertLayout, capsys: pytest.CaptureFixture[str]) -> None:
    first, second, code = setup(tmp_path, certs)
    a = _data(capsys, first, code)
    b = _data(capsys, second, code)
    _same_shape(a, b)
    _same_shape(b, a)


def test_traces_data_has_the_spans(tmp_path: Path, certs: CertLayout, capsys: pytest.CaptureFixture[str]) -> None:
    _, argv, _ = _traces(tmp_path, certs)
    data = _data(capsys, argv)
    (trace,) = data["traces"]
    assert trace["services"] == ["learner-svc", "auth-svc"]
    assert trace["errors"] == 1
    assert [s["failed"] for s in trace["spans"]] == [False, True]
    empty = _data(capsys, ["traces", "--state-dir", str(tmp_path / "empty")])
    assert empty["traces"] == [] and empty["collector"] is None


def test_the_schema_of_a_failing_run_is_that_of_a_passing_one(
        tmp_path: Path, certs: CertLayout, capsys: pytest.CaptureFixture[str]) -> None:
    good_verify = _data(capsys, ["certs", "verify", "-d", str(certs.root), "--config", MESH_FILE])
    good_check = _data(capsys, ["check", "--config", MESH_FILE, "-d", str(certs.root),
                                "--state-dir", str(tmp_path / "state")])
    certs.identity_paths("auth-svc")[1].chmod(0o644)
    bad_verify = _data(capsys, ["certs", "verify", "-d", str(certs.root), "--config", MESH_FILE], code=1)
    bad_check = _data(capsys, ["check", "--config", MESH_FILE, "-d", str(certs.root),
                               "--state-dir", str(tmp_path / "state")], code=1)
    assert (good_verify["ok"], bad_verify["ok"], good_check["ok"], bad_check["ok"]) == (True, False, True, False)
    _same_shape(good_verify, bad_verify)
    _same_shape(good_check, bad_check)


def test_certs_init_issue_rotate_print_what_they_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = str(tmp_path / "certs")
    code, out, err = _run(capsys, "certs", "init", "-d", where, "--config", MESH_FILE, "-o", "json")
    assert code == 0, err
    init = json.loads(out)
    assert len(init["certificates"]) == 2 and init["trust_domain"] == "aivo.local"
    code, out, err = _run(capsys, "certs", "issue", "--all", "-d", where, "--config", MESH_FILE, "-o", "yaml")
    assert code == 0, err
    issued = next(c for c in yaml.safe_load(out)["certificates"] if c["name"] == "auth-svc")
    assert issued["name"] == "auth-svc" and len(issued["spki_pin"]) == 44
    code, out, err = _run(capsys, "certs", "rotate", "auth-svc", "-d", where, "--config", MESH_FILE, "-o", "json")
    assert code == 0, err
    rotated = json.loads(out)
    assert [c["name"] for c in rotated["certificates"]] == ["auth-svc"]
    assert rotated["certificates"][0]["serial"] != issued["serial"]
    assert rotated["revoked"] == []
    # Nothing to rotate: the same keys, empty lists.
    code, out, _ = _run(capsys, "certs", "rotate", "-d", where, "--config", MESH_FILE, "--renew-before-days", "1",
                        "-o", "json")
    assert code == 0
    assert json.loads(out) == {"certs_dir": where, "certificates": [], "revoked": []}


def test_the_former_json_flags_still_mean_o_json(certs: CertLayout, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "certs", "inspect", "-d", str(certs.root), "--json")
    assert code == 0
    assert json.loads(out)["certs_dir"] == str(certs.root)
    code, _, err = _run(capsys, "certs", "inspect", "-d", str(certs.root), "--json", "-o", "yaml")
    assert code == 2
    assert "--json means -o json" in err
    code, out, _ = _run(capsys, "config", "show", MESH_FILE, "--format", "json")
    assert code == 0
    assert "services" in json.loads(out)


# --- render --output-dir - -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["linkerd", "envoy"])
def test_render_output_dir_dash_writes_one_yaml_stream_to_stdout(
        target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "render", target, "--config", MESH_FILE, "--output-dir", "-")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []  # no directory named "-", nothing written
    docs = [d for d in yaml.safe_load_all(out) if d is not None]
    from aivo_mesh.config import load_mesh

    files = render_target(target, load_mesh(MESH_FILE))
    streamed = {rel: text for rel, text in files.items()
                if rel.endswith((".yaml", ".json")) and not rel.endswith("kustomization.yaml")}
    expected = [d for text in streamed.values() for d in yaml.safe_load_all(text) if d is not None]
    assert docs == expected
    for rel in streamed:
        assert f"# Source: {rel}" in out
    for rel in set(files) - set(streamed):
        assert f"left out of the stream: {rel}" in err
    if target == "linkerd":  # what `kubectl apply -f -` takes: every document a Kubernetes object
        assert docs and all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)


def test_render_output_dir_dash_refuses_check_and_several_targets(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "render", "linkerd", "--config", MESH_FILE, "--output-dir", "-", "--check")
    assert code == 2 and "--output-dir - writes to stdout" in err
    code, _, err = _run(capsys, "render", "all", "--config", MESH_FILE, "--output-dir", "-")
    assert code == 2 and "single target" in err


@pytest.mark.parametrize("command", [("status",), ("edges",), ("routes", "auth-svc")])
def test_watch_prints_one_document_per_refresh_until_interrupted(tmp_path: Path, command: tuple[str, ...]) -> None:
    """`--watch -o json`: a new document every `--refresh` seconds, until Ctrl-C (SIGINT), then the exit code
    of the last one. No mesh runs from the state dir: each document says so, in the command's one schema."""
    import signal
    import subprocess

    from helpers import checkout_env, interruptible

    from aivo_mesh.runtime.supervisor import meshctl_argv

    proc = subprocess.Popen(
        meshctl_argv(*command, "--watch", "--refresh", "0.5", "-o", "json", "--state-dir", str(tmp_path / "none")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=checkout_env(), preexec_fn=interruptible)
    assert proc.stdout is not None
    seen = 0
    deadline = time.monotonic() + 60
    text = ""
    while seen < 3 and time.monotonic() < deadline:  # each document ends with a "}" alone on its line
        line = proc.stdout.readline()
        if not line:
            break
        text += line
        seen += line == "}\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert seen == 3, text + out + err
    assert proc.returncode == 0, err
    decoder, pos, docs = json.JSONDecoder(), 0, []
    while pos < len(text.rstrip()):
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    assert len(docs) == 3 and len({json.dumps(sorted(d)) for d in docs}) == 1  # one schema, every refresh
