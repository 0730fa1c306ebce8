"""The two install routes (pip via pyproject.toml, conda via environment.yml) stay in sync."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _key(spec: str) -> tuple[str, frozenset, str]:
    req = Requirement(spec)
    return canonicalize_name(req.name), frozenset(req.extras), str(req.specifier)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one pip: list"
    return [s for s in pips[0] if not s.strip().startswith("-e")]


def test_pyproject_and_environment_list_the_same_requirements():
    project = _pyproject()["project"]
    pip_side = sorted(_key(s) for s in project["dependencies"] + project["optional-dependencies"]["dev"])
    conda_side = sorted(_key(s) for s in _conda_pip())
    missing = sorted(set(pip_side) - set(conda_side))
    extra = sorted(set(conda_side) - set(pip_side))
    assert not missing and not extra, f"only in pyproject.toml: {missing}; only in environment.yml: {extra}"
    assert len(conda_side) == len(set(conda_side)), "a requirement is listed twice in environment.yml"


def test_environment_installs_the_project_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert any(s.replace(" ", "") == "-e." for s in pip)
    assert "pip" in env["dependencies"]


def test_requirements_are_lower_bounded_and_parseable():
    project = _pyproject()["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        assert any(s.operator == ">=" for s in req.specifier), f"{spec}: give a lower bound"


def test_packages_and_package_data_exist():
    cfg = _pyproject()["tool"]["setuptools"]
    for pattern in cfg["packages"]["find"]["include"]:
        pkg = pattern.rstrip("*")
        assert (ROOT / pkg / "__init__.py").is_file(), f"{pkg} is not a package"
    for pkg, globs in cfg["package-data"].items():
        for g in globs:
            assert list((ROOT / pkg).glob(g)), f"package data {pkg}/{g} matches nothing"
    assert (ROOT / "ablate" / "conf" / "base.yaml").is_file()


def test_tests_are_a_package():
    assert (ROOT / "tests" / "__init__.py").is_file()


def test_ci_entry_point():
    run = ROOT / ".ci" / "run"
    if not run.exists():
        pytest.skip(".ci/run is not written yet")
    assert os.access(run, os.X_OK), ".ci/run must be executable"
    assert "pytest" in run.read_text()


def test_readme_tells_how_to_run_the_tests():
    text = (ROOT / "README.md").read_text()
    body = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("# ")]
    if len(body) < 3:
        pytest.skip("README.md has no content yet")
    assert "pytest" in text or ".ci/run" in text, "README.md should say how to run the tests"
