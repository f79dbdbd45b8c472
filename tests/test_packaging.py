"""What `pip install sparseswaps` puts into site-packages: the sparseswaps package only."""
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_sparseswaps_namespace_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=config["include"])
    assert "sparseswaps.solvers" in packages
    assert all(name == "sparseswaps" or name.startswith("sparseswaps.") for name in packages)


def test_optional_backends_are_extras_and_the_test_extra_brings_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert not any(name in core for name in ("pyscipopt", "highspy", "numba", "matplotlib", "lm-eval", "ray"))
    extras = project["optional-dependencies"]
    assert {"exact", "cpu", "plots", "eval", "ray"} <= set(extras)
    assert "sparseswaps[exact,cpu,plots,ray]" in extras["test"]
