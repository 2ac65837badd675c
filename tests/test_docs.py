"""What the docs and --help texts tell a first-time user matches the code and the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aivo_mesh.config import EnvSettings, MeshSpec, apply_env, load_mesh
from aivo_mesh.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def _flat(path: Path) -> str:
    """The text with every run of whitespace as one space: quoted messages may wrap across lines."""
    return " ".join(path.read_text(encoding="utf-8").split())


@pytest.fixture(scope="module")
def mesh() -> MeshSpec:
    return load_mesh(ROOT / "mesh.yaml")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_exist(doc: Path) -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8"))
    assert [t for t in targets if not t.startswith("http") and not (doc.parent / t).exists()] == []


# What a reader of this repository cannot follow: files outside it, and the tracker's wording.
NOT_STANDING_ALONE = re.compile(r"\.\./shared|\bshared/|\bnotes/[\w.-]+\.md\b|\bshared notes\b|\bthe issue\b|"
                                r"\bissue(?:'s)? targets?\b", re.IGNORECASE)


@pytest.mark.parametrize("doc", [*DOCS, *sorted((ROOT / "benchmarks").glob("*.py"))], ids=lambda p: p.name)
def test_docs_stand_on_their_own(doc: Path) -> None:
    """The docs (and the benchmarks' --help) speak of the project alone: no team notes outside the
    repository, no issue tracker's targets."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    assert [f"{n}: {line}" for n, line in enumerate(lines, 1) if NOT_STANDING_ALONE.search(line)] == []


def test_port_clash_example_of_the_environment_is_what_apply_env_says(mesh: MeshSpec) -> None:
    doc = _flat(ROOT / "docs" / "config.md")
    with pytest.raises(ConfigError) as info:
        apply_env(mesh, EnvSettings.from_environ({"SERVICE_NAME": "auth-svc", "GRPC_PORT": "9901"}))
    assert f"`{info.value}`" in doc
    # Another service's port is not a clash (each deployed service has its own network namespace).
    assert apply_env(mesh, EnvSettings(service_name="auth-svc", grpc_port=50052)).service("auth-svc").port == 50052
    assert "(`GRPC_PORT=50052` for auth-svc is accepted)" in doc


def test_config_validate_help_and_behaviour_fall_back_to_the_repositorys_mesh_yaml(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from aivo_mesh.cli import main

    monkeypatch.delenv("AIVO_MESH_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./mesh.yaml here
    assert main(["config", "validate", "--help"]) == 0
    assert "else the repository's mesh.yaml" in " ".join(capsys.readouterr().out.split())
    assert main(["config", "validate"]) == 0
    assert capsys.readouterr().out.startswith(f"{ROOT / 'mesh.yaml'}: OK")


def test_no_file_holds_an_unresolved_merge() -> None:
    """A merge left half done shows as conflict markers in a page people read (it happened once)."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "*.md", "*.py", "*.yaml", "*.yml", "*.toml", "Makefile"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.split()
    if not files:
        pytest.skip("not a git checkout: no list of tracked files")
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.MULTILINE)
    assert [f for f in files if (ROOT / f).is_file() and marker.search((ROOT / f).read_text(errors="replace"))] == []
