"""The distribution ships every package of the module: pyproject.toml lists packages
one by one, so a new subpackage that is not listed would be missing from the wheel (an
editable install, as the tests use, would not show it)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "synapse_xsign_uia").rglob("__init__.py")
    }
    assert on_disk == listed
