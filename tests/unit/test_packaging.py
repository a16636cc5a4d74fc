"""The distribution ships every package of the module, and nothing else: pyproject.toml
lets setuptools find the packages by name, so a new subpackage is included without a
change there, provided it has an `__init__.py` (an editable install, as the tests use,
would not show a missing one). The packaging checks (`tox -e packaging`) look into the
built wheel itself."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "synapse_xsign_uia"


def _find_config() -> dict[str, object]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    assert isinstance(find, dict)
    return find


def _included(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def test_every_package_of_the_module_is_included() -> None:
    find = _find_config()
    include = find["include"]
    assert isinstance(include, list)
    packages = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in PACKAGE.rglob("__init__.py")
    }
    assert {"synapse_xsign_uia", "synapse_xsign_uia._synapse", "synapse_xsign_uia.resync"} <= (
        packages
    )
    assert all(_included(name, include) for name in packages)
    # Only directories with an `__init__.py` are packages (no stray `__pycache__`).
    assert find.get("namespaces") is False


def test_every_directory_with_python_files_is_a_package() -> None:
    """setuptools leaves out a directory without an `__init__.py`, and its modules."""
    for module in PACKAGE.rglob("*.py"):
        assert (module.parent / "__init__.py").exists(), module


def test_the_tests_are_not_included() -> None:
    include = _find_config()["include"]
    assert isinstance(include, list)
    for name in ("tests", "tests.harness", "benchmarks", "tools"):
        assert not _included(name, include)


def test_the_version_is_defined_once() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "synapse_xsign_uia.__version__"
    }


def test_synapse_is_not_an_install_requirement() -> None:
    """Installing the module must never upgrade or downgrade the operator's Synapse."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [dep for dep in project["dependencies"] if dep.startswith("matrix-synapse")]
    assert [dep for dep in project["optional-dependencies"]["test"] if "matrix-synapse" in dep]
