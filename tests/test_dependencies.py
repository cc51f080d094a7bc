"""A fresh install must reproduce CI: the installed stack fits pyproject's bounds and its parts accept
each other. These fail with one line naming the package and the fix, before a user meets the clash."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("sd", "llm", "ui", "dev"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]
                 if not r.startswith("reflora-diffusion")]
    return reqs


def _installed(name: str) -> Version | None:
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


@pytest.mark.parametrize("req", _requirements(), ids=str)
def test_installed_version_is_within_pyproject_bounds(req):
    version = _installed(req.name)
    if version is None:
        pytest.skip(f"{req.name} is not installed")
    assert req.specifier.contains(version, prereleases=True), (
        f"{req.name} {version} is outside pyproject's {req}: reinstall with pip install -e '.[dev]', "
        f"or widen the bound after the suite passes on {version}")


def test_every_fast_moving_dependency_has_an_upper_bound():
    loose = [str(r) for r in _requirements()
             if r.name in {"torch", "peft", "transformers", "diffusers", "accelerate", "huggingface_hub",
                           "gradio", "datasets", "safetensors"}
             and not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert not loose, f"no tested upper bound for {loose}: a fresh install may pick an untested release"


def _min_peft(module) -> Version:
    path = Path(module.__file__)
    text = path.read_text()
    found = re.search(r'MIN_PEFT_VERSION\s*=\s*"([^"]+)"', text)
    assert found, f"no MIN_PEFT_VERSION in {path}: update this test for the new layout"
    return Version(found.group(1))


@pytest.mark.parametrize("owner", ["transformers", "diffusers"])
def test_installed_peft_satisfies_what_transformers_and_diffusers_demand(owner):
    if owner == "transformers":
        import transformers.integrations.peft as module
    else:
        import diffusers.utils.constants as module
    need, have = _min_peft(module), _installed("peft")
    assert have >= need, (
        f"{owner} {_installed(owner)} requires peft >= {need} but peft {have} is installed: lower {owner}'s "
        f"upper bound in pyproject.toml to a release that accepts peft {have}")
