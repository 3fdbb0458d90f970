"""The supported version ranges: the same in pyproject.toml as in the start-up check, which refuses
a version outside them with one line naming it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fitdist.errors import UserError
from fitdist.versions import SUPPORTED, check_versions, requirement

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_states_the_ranges_the_check_enforces():
    text = (ROOT / "pyproject.toml").read_text()
    for package in SUPPORTED:
        stated = set(re.findall(rf'"({package}[<>=!~][^"]*)"', text))
        assert stated == {requirement(package)}, (package, stated)


def test_the_installed_versions_are_supported():
    check_versions(("torch", "torchvision", "deepspeed"))


@pytest.mark.parametrize(("package", "version"), [("torch", "2.5.1"), ("torch", "2.15.0"), ("torch", "2.14.0+cu124"),
                                                  ("torchvision", "0.20.1"), ("deepspeed", "0.14.4")])
def test_a_version_outside_its_range_is_one_clear_error(package, version):
    with pytest.raises(UserError, match=rf"^{package} {re.escape(version)} is installed, but fitdist supports "
                                        rf"{re.escape(requirement(package))} "):
        check_versions((package,), {package: version})


@pytest.mark.parametrize("version", ["2.14.1", "2.14.1+cu130", "2.14.3"])
def test_versions_inside_the_range_pass(version):
    check_versions(("torch",), {"torch": version})


def test_the_override_runs_anyway(monkeypatch):
    monkeypatch.setenv("FITDIST_UNTESTED_VERSIONS", "1")
    check_versions(("torch",), {"torch": "2.5.1"})


def test_the_cli_checks_at_start(tmp_path):
    # a sitecustomize that makes importlib report an old torch, as on an image with another base
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n_v = m.version\n"
        "m.version = lambda name: '2.5.1' if name == 'torch' else _v(name)\n")
    done = subprocess.run([sys.executable, "-m", "fitdist.cli", "train", "nonexistent.yaml"], capture_output=True,
                          text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (f"fitdist: error: torch 2.5.1 is installed, but fitdist supports {requirement('torch')} "
         f"(pip install '{requirement('torch')}'; or FITDIST_UNTESTED_VERSIONS=1 to run on it untested)")]


@pytest.mark.parametrize("path", ["launch/setup.sh", "Dockerfile"])
def test_installs_pin_the_tested_versions(path):
    text = (ROOT / path).read_text()
    for package in ("torch", "torchvision"):
        assert re.findall(rf'"{package}==([^"]+)"', text) == [SUPPORTED[package][0]], (path, package)
