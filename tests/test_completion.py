"""`meshctl completion bash|zsh|fish`: the scripts, and the completion protocol they drive (service
names from mesh.yaml, hidden commands never offered), run against real meshctl processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from helpers import checkout_env

ROOT = Path(__file__).resolve().parents[1]
# A mesh whose service names are not the repository's: completions come from the mesh.yaml in effect.
RENAMES = {"auth-svc": "alpha-svc", "analytics-svc": "atlas-svc"}


UNSET = ["AIVO_MESH_CONFIG"]  # completions come from the project's mesh.yaml


def meshctl(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return helpers.meshctl(*args, cwd=cwd, timeout=60, unset=UNSET, env=env)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    text = (ROOT / "mesh.yaml").read_text()
    for old, new in RENAMES.items():
        text = text.replace(old, new)
    (tmp_path / "mesh.yaml").write_text(text)
    return tmp_path


def complete(project: Path, words: str, shell: str = "bash", **env: str) -> list[str]:
    """What meshctl answers the script's callback with, for the last (possibly empty) word of `words`."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    # fish passes the word being completed itself; bash and zsh its index.
    current = ("" if words.endswith(" ") else words.split()[-1]) if shell == "fish" else str(cword)
    done = meshctl(cwd=project, _MESHCTL_COMPLETE=f"{shell}_complete", COMP_WORDS=words, COMP_CWORD=current,
                   **env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return [line for line in done.stdout.splitlines() if line]


def test_service_arguments_complete_to_the_services_of_mesh_yaml(project: Path) -> None:
    assert complete(project, "meshctl serve a") == ["plain,alpha-svc", "plain,atlas-svc"]
    assert complete(project, "meshctl traces --service at") == ["plain,atlas-svc"]
    assert complete(project, "meshctl consul register l") == ["plain,learner-svc"]
    assert complete(project, "meshctl xds bootstrap at") == ["plain,atlas-svc"]
    # Certificates are issued for clients too.
    assert "plain,mesh-client" in complete(project, "meshctl certs rotate ")
    # --config names the mesh.yaml to read, as it does for the command.
    assert complete(project, f"meshctl serve --config {ROOT / 'mesh.yaml'} a") == ["plain,auth-svc",
                                                                                  "plain,analytics-svc"]
    # A broken mesh.yaml offers nothing (and no traceback reaches the shell).
    (project / "mesh.yaml").write_text("services: [\n")
    assert complete(project, "meshctl serve a") == []


def test_hidden_commands_are_never_offered(project: Path) -> None:
    offered = [line.split(",", 1)[1] for line in complete(project, "meshctl ")]
    assert {"check", "completion", "certs", "serve", "status", "up", "down"} <= set(offered)
    assert "collector" not in offered and "_supervise" not in offered
    assert [line.split(",", 1)[1] for line in complete(project, "meshctl co")] == [
        "completion", "config", "config-dump", "conformance", "consul"]
    assert "control-plane" not in offered  # the process `meshctl up` runs, not a command for people


@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete -o nosort -F _meshctl_completion meshctl"),
                                                ("zsh", "#compdef meshctl"),
                                                ("fish", "complete --no-files --command meshctl")])
def test_completion_prints_the_script_of_each_shell(project: Path, shell: str, marker: str) -> None:
    done = meshctl("completion", shell, cwd=project)
    assert done.returncode == 0, done.stderr
    assert marker in done.stdout
    assert f"_MESHCTL_COMPLETE={shell}_complete" in done.stdout
    # The protocol each script speaks answers with the service names.
    answer = "\n".join(complete(project, "meshctl serve a", shell=shell))
    assert "alpha-svc" in answer and "atlas-svc" in answer


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_bash_script_completes_service_names_in_bash(project: Path, tmp_path: Path) -> None:
    # The script calls `meshctl` by name: put one that runs this checkout first on PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "meshctl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m aivo_mesh "$@"\n')
    (bin_dir / "meshctl").chmod(0o755)
    script = ('source <(meshctl completion bash)\n'
              'COMP_WORDS=(meshctl serve a); COMP_CWORD=2; _meshctl_completion meshctl\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    done = subprocess.run(["bash", "--norc", "-c", script], cwd=project,
                          env=checkout_env(UNSET, {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["alpha-svc", "atlas-svc"]


def test_completion_needs_a_shell_and_a_typo_never_suggests_a_hidden_command(project: Path) -> None:
    done = meshctl("completion", cwd=project)
    assert done.returncode == 2
    assert "bash" in done.stderr and "zsh" in done.stderr and "fish" in done.stderr
    assert "collector" not in done.stderr
    done = meshctl("collectr", cwd=project)
    assert done.returncode == 2
    assert "No such command 'collectr'" in done.stderr
    assert "collector" not in done.stderr.replace("'collectr'", "")
    done = meshctl("chek", cwd=project)
    assert "Did you mean 'check'?" in done.stderr
