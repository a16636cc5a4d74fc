"""The release artefacts, checked as an operator would use them: the sdist and the wheel
are built with `python -m build` and pass `twine check`; the wheel, installed beside the
newest supported Synapse in a fresh virtual environment, loads there; installed into an
environment with an unsupported Synapse, it leaves that Synapse as it was and stops it at
start-up with a message naming the supported range.

These checks build packages and virtual environments, so they run in their own tox
environment (`tox -e packaging`), not with the rest of the tests.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from email.parser import HeaderParser
from pathlib import Path

import pytest

from tests.harness.server import SynapseServer

pytestmark = pytest.mark.packaging

if importlib.util.find_spec("build") is None or importlib.util.find_spec("twine") is None:
    pytest.skip(
        "the packaging checks need build and twine: run them with `tox -e packaging`",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "synapse_xsign_uia"
DISTRIBUTION = "synapse-xsign-uia"
# The release just before the oldest supported one; it must stay outside the range.
UNSUPPORTED_SYNAPSE = "1.97.0"
# What an old Synapse needs on a current Python environment (as in tox.ini): releases up
# to 1.140 fail to import with prometheus-client 0.24 and later, and old ones import
# pkg_resources, which setuptools 82 removed.
OLD_SYNAPSE_PINS = ("prometheus-client<0.24", "setuptools<82")
STARTUP_TIMEOUT = 180.0


def _constant(path: Path, name: str) -> object:
    """The value of a module-level constant of a source file, read without importing it
    (the module imports Synapse, which this environment does not have)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not defined in {path}")


VERSION = str(_constant(PACKAGE / "__init__.py", "__version__"))
OLDEST = _constant(PACKAGE / "_synapse" / "support.py", "OLDEST_SUPPORTED")
NEWEST = _constant(PACKAGE / "_synapse" / "support.py", "NEWEST_SUPPORTED")
assert isinstance(OLDEST, tuple)
assert isinstance(NEWEST, tuple)
OLDEST_SYNAPSE = ".".join(str(part) for part in OLDEST)
NEWEST_SYNAPSE = ".".join(str(part) for part in NEWEST)
assert tuple(int(part) for part in UNSUPPORTED_SYNAPSE.split(".")) < OLDEST


def _run(command: Sequence[str | Path], *, timeout: float = 600, cwd: Path | None = None) -> str:
    """Run `command`; its output, or a failure that shows it."""
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, command))} exited with {result.returncode}:\n{result.stdout}"
        )
    return result.stdout


def _clean_env() -> dict[str, str]:
    """The environment without anything that would make a virtual environment's Python
    import the checkout, or another environment's packages, instead of its own."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


class Venv:
    """A fresh virtual environment, created with the running interpreter's `venv`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        _run([sys.executable, "-m", "venv", directory])
        self.python = directory / "bin" / "python"

    @classmethod
    def with_synapse(cls, directory: Path, version: str, *requirements: str) -> Venv:
        venv = cls(directory)
        venv.pip_install(f"matrix-synapse=={version}", *requirements)
        return venv

    def pip_install(self, *requirements: str | Path) -> None:
        _run(
            [self.python, "-m", "pip", "install", "--disable-pip-version-check", *requirements],
            cwd=self.directory,
        )

    def installed(self) -> set[str]:
        """Every installed distribution, as `name==version`."""
        output = _run(
            [self.python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
            cwd=self.directory,
        )
        return {line.strip() for line in output.splitlines() if line.strip()}

    def version_of(self, distribution: str) -> str:
        return _run(
            [
                self.python,
                "-c",
                f"import importlib.metadata as m; print(m.version({distribution!r}))",
            ],
            cwd=self.directory,
        ).strip()

    def remove(self) -> None:
        """Free the space (over 200 MB with Synapse); a failed test keeps its environment
        for inspection, in pytest's temporary directory."""
        shutil.rmtree(self.directory)

    def module_origin(self) -> Path:
        """Where the module is imported from (found without importing Synapse)."""
        return Path(
            _run(
                [
                    self.python,
                    "-c",
                    "import importlib.util; "
                    "print(importlib.util.find_spec('synapse_xsign_uia').origin)",
                ],
                cwd=self.directory,
            ).strip()
        )


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist and the wheel, built as for a release (the wheel from the sdist)."""
    outdir = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", outdir, ROOT], cwd=ROOT)
    sdists = sorted(outdir.glob("*.tar.gz"))
    wheels = sorted(outdir.glob("*.whl"))
    assert len(sdists) == 1, sdists
    assert len(wheels) == 1, wheels
    return sdists[0], wheels[0]


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Synapse started by the harness inherits this process's environment: without
    PYTHONPATH, it imports the module from its virtual environment, not the checkout."""
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        monkeypatch.delenv(name, raising=False)
    yield


def _source_modules() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")}


def test_twine_check_passes(dist: tuple[Path, Path]) -> None:
    sdist, wheel = dist
    output = _run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel])
    assert output.count("PASSED") == 2, output


def test_the_wheel_holds_the_module_and_nothing_else(dist: tuple[Path, Path]) -> None:
    from packaging.requirements import Requirement  # a dependency of build

    _, wheel = dist
    assert wheel.name == f"synapse_xsign_uia-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = HeaderParser().parsestr(
            archive.read(f"synapse_xsign_uia-{VERSION}.dist-info/METADATA").decode()
        )
    modules = {name for name in names if not name.startswith(f"synapse_xsign_uia-{VERSION}.")}
    assert modules == _source_modules() | {"synapse_xsign_uia/py.typed"}

    assert metadata["Name"] == DISTRIBUTION
    assert metadata["Version"] == VERSION
    requirements = [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]
    # Synapse is required only by the test extra: installing the module never changes it.
    synapse = [req for req in requirements if req.name == "matrix-synapse"]
    assert synapse, requirements
    assert all(req.marker is not None and "extra" in str(req.marker) for req in synapse)
    assert not metadata.get_all("Project-URL")


def test_the_sdist_holds_the_module(dist: tuple[Path, Path]) -> None:
    sdist, _ = dist
    assert sdist.name == f"synapse_xsign_uia-{VERSION}.tar.gz"
    prefix = f"synapse_xsign_uia-{VERSION}/"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(prefix) for name in archive.getnames()}
    assert _source_modules() | {"synapse_xsign_uia/py.typed"} <= names
    assert {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO"} <= names


def _wait_for_log(server: SynapseServer, needle: str, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = server.log_lines(needle)
        if lines:
            return lines
        time.sleep(0.2)
    pytest.fail(f"no {needle!r} in the log of Synapse:\n{server.tail()}")


def _install_the_wheel(venv: Venv, wheel: Path) -> None:
    """Install the wheel as an operator would (plain `pip install`, no constraints), and
    check that pip added it and changed nothing else: not Synapse, not its dependencies."""
    before = venv.installed()
    venv.pip_install(wheel)
    after = venv.installed()
    assert after - before == {f"{DISTRIBUTION}=={VERSION}"}
    assert before - after == set()
    assert venv.version_of(DISTRIBUTION) == VERSION
    assert venv.module_origin().is_relative_to(venv.directory)


@pytest.mark.usefixtures("clean_environment")
def test_the_wheel_loads_in_the_newest_supported_synapse(
    dist: tuple[Path, Path], tmp_path: Path
) -> None:
    _, wheel = dist
    venv = Venv.with_synapse(tmp_path / "venv", NEWEST_SYNAPSE)
    _install_the_wheel(venv, wheel)
    assert venv.version_of("matrix-synapse") == NEWEST_SYNAPSE

    server = SynapseServer({}, name="packaging", python=venv.python)
    try:
        server.start(timeout=STARTUP_TIMEOUT)
        assert _wait_for_log(server, f"synapse_xsign_uia {VERSION} loaded (single process)")
        assert _wait_for_log(server, "synapse_xsign_uia self-check passed")
    finally:
        server.stop()
    venv.remove()


@pytest.mark.usefixtures("clean_environment")
def test_the_wheel_leaves_an_unsupported_synapse_alone_and_refuses_to_start(
    dist: tuple[Path, Path], tmp_path: Path
) -> None:
    _, wheel = dist
    venv = Venv.with_synapse(tmp_path / "venv", UNSUPPORTED_SYNAPSE, *OLD_SYNAPSE_PINS)
    _install_the_wheel(venv, wheel)
    assert venv.version_of("matrix-synapse") == UNSUPPORTED_SYNAPSE

    server = SynapseServer({}, name="packaging-unsupported", python=venv.python)
    try:
        with pytest.raises(RuntimeError, match="exited with"):
            server.start(timeout=STARTUP_TIMEOUT)
        output = server.tail(lines=400)
        expected = (
            f"synapse_xsign_uia supports Synapse {OLDEST_SYNAPSE} to {NEWEST_SYNAPSE} and "
            "cannot run here: "
            f"this is Synapse {UNSUPPORTED_SYNAPSE}."
        )
        assert expected in output, output
    finally:
        server.stop()
    venv.remove()


def test_the_wheel_installs_the_command_line_tool(dist: tuple[Path, Path], tmp_path: Path) -> None:
    """`synapse-xsign-uia` runs from the wheel alone, without Synapse or the module's
    dependencies, as on an operator's machine away from the homeserver."""
    _, wheel = dist
    venv = Venv(tmp_path / "venv")
    venv.pip_install("--no-deps", wheel)
    tool = venv.directory / "bin" / "synapse-xsign-uia"
    assert _run([tool, "--version"]).strip() == f"synapse-xsign-uia {VERSION}"
    # Nothing listens on port 1: the tool gets as far as connecting, with exit status 3.
    result = subprocess.run(
        [tool, "--homeserver", "http://127.0.0.1:1", "window", "status", "@alice:example.org"],
        env={**_clean_env(), "SYNAPSE_XSIGN_UIA_TOKEN": "not-a-real-token"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (3, ""), result.stderr
    assert "Cannot reach http://127.0.0.1:1" in result.stderr
    venv.remove()
