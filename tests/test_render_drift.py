"""The rendered files checked in under infra/mesh/ are exactly what mesh.yaml renders to."""

from __future__ import annotations

from pathlib import Path

import pytest

from aivo_mesh.cli import main
from aivo_mesh.render import TARGETS

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "mesh.yaml")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_target_matches_its_checked_in_files(target, capsys):
    code = main(["render", target, "--config", CONFIG, "--check"])
    out = capsys.readouterr()
    assert code == 0, f"drift in {target}; run `meshctl render {target}`\n{out.err}"


def test_render_all_check_exits_zero(capsys):
    code = main(["render", "all", "--config", CONFIG, "--check"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "rendered files match mesh.yaml" in out.out


def test_check_reports_drift_without_writing(tmp_path, capsys):
    out_dir = tmp_path / "prometheus"
    assert main(["render", "prometheus", "--config", CONFIG, "--output-dir", str(out_dir)]) == 0
    rules = out_dir / "rules" / "mesh-alerts.yml"
    rules.write_text(rules.read_text().replace("for: 1m", "for: 2m"))
    capsys.readouterr()
    assert main(["render", "prometheus", "--config", CONFIG, "--output-dir", str(out_dir), "--check"]) == 1
    assert "drift" in capsys.readouterr().err
    assert "for: 2m" in rules.read_text()  # --check never writes
