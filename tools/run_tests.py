#!/usr/bin/env python3
"""Run every check of the project: `python3 tools/run_tests.py`.

Needs nothing but Python 3.10 or later. The first run creates a small virtual environment
`.venv/tools` holding tox, and later runs reuse it; tox then builds one environment per
check (see `tox.ini`) under `.tox/`:

    check_codestyle   ruff check + ruff format --check
    check_types       mypy
    synapse-oldest    the tests against the oldest supported Synapse
    synapse-latest    the tests against the newest supported Synapse
    packaging         build the sdist and wheel, twine check, install the wheel beside Synapse
    synapse-upstream  Synapse's own tests, without and with the module (newest Synapse)

Every environment runs even if an earlier one fails; the exit status is tox's, non-zero if
any of them failed. Arguments this script does not know go to pytest in synapse-oldest and
synapse-latest, as do all arguments after `--`:

    python3 tools/run_tests.py -k admin -x
    python3 tools/run_tests.py --envs synapse-latest -- tests/unit
    XSIGN_TEST_ENVS=check_codestyle,check_types python3 tools/run_tests.py
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shlex
import shutil
import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS_VENV = ROOT / ".venv" / "tools"
TOX_REQUIREMENT = "tox>=4,<5"
TOX_MAJOR = "4"
ALL_ENVS = (
    "check_codestyle",
    "check_types",
    "synapse-oldest",
    "synapse-latest",
    "packaging",
    "synapse-upstream",
)
ENVS_VARIABLE = "XSIGN_TEST_ENVS"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def venv_python(directory: Path) -> Path:
    if os.name == "nt":
        return directory / "Scripts" / "python.exe"
    return directory / "bin" / "python"


def show(command: Sequence[str | Path]) -> str:
    shown = []
    for part in command:
        text = str(part)
        if isinstance(part, Path):
            with contextlib.suppress(ValueError):
                text = str(part.relative_to(ROOT))
        shown.append(shlex.quote(text))
    return " ".join(shown)


def has_tox(python: Path) -> bool:
    """Whether `python` exists, runs, and has tox of the pinned major version."""
    if not python.exists():
        return False
    check = f"import sys, tox; sys.exit(0 if tox.__version__.split('.')[0] == {TOX_MAJOR!r} else 1)"
    result = subprocess.run(
        [str(python), "-c", check],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return result.returncode == 0


def ensure_tox() -> Path:
    """The bootstrap environment's interpreter, with tox installed; created if needed."""
    python = venv_python(TOOLS_VENV)
    if has_tox(python):
        say(f"Reusing {TOOLS_VENV.relative_to(ROOT)} (tox already installed)")
        return python

    if python.exists():
        say(f"Recreating {TOOLS_VENV.relative_to(ROOT)} (no usable tox in it)")
    else:
        say(f"Creating {TOOLS_VENV.relative_to(ROOT)} with {sys.executable}")
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(TOOLS_VENV)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(
            f"Could not create {TOOLS_VENV}: {e}\n"
            "Python's venv and ensurepip modules are needed; on Debian and Ubuntu install "
            "them with `apt-get install python3-venv`."
        )

    install: list[str | Path] = [
        python,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        TOX_REQUIREMENT,
    ]
    say(f"Installing {TOX_REQUIREMENT}: {show(install)}")
    if subprocess.run([str(part) for part in install], check=False).returncode != 0:
        sys.exit(f"Installing {TOX_REQUIREMENT} into {TOOLS_VENV} failed")
    return python


def _node_major() -> int:
    node = shutil.which("node")
    if node is None:
        return 0
    try:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    major = version.strip().lstrip("v").split(".")[0]
    return int(major) if major.isdigit() else 0


def skipped_suites() -> list[str]:
    """The tests that skip themselves on this machine, and what they need: the same checks
    as the tests make (tests/harness/workers.py, tests/integration/test_real_client.py)."""
    skipped = []
    has_postgres = shutil.which("initdb") is not None or bool(
        glob.glob("/usr/lib/postgresql/*/bin/initdb")
    )
    if not (has_postgres and shutil.which("redis-server")):
        skipped.append(
            "the worker tests need the PostgreSQL and Redis servers "
            "(`apt-get install postgresql redis-server`)"
        )
    if _node_major() < 20 or shutil.which("npm") is None:
        skipped.append(
            "the real-client test needs Node.js 20 or later and npm "
            "(https://nodejs.org, or your distribution's packages)"
        )
    return skipped


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        own, after = argv[:split], argv[split + 1 :]
    else:
        own, after = argv, []
    parser = argparse.ArgumentParser(
        description="Run the project's checks and tests through tox.",
        epilog="Unknown arguments, and all arguments after `--`, are passed to pytest.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--envs",
        default=os.environ.get(ENVS_VARIABLE) or ",".join(ALL_ENVS),
        help=(
            "comma-separated tox environments to run "
            f"(default: ${ENVS_VARIABLE}, or all of {','.join(ALL_ENVS)})"
        ),
    )
    parser.add_argument(
        "--recreate",
        action="store_true",
        help="rebuild the tox environments from scratch",
    )
    args, unknown = parser.parse_known_args(own)
    return args, unknown + after


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - a clear message on an old python3
        sys.exit(f"Python 3.10 or later is needed; this is {sys.version.split()[0]}")
    args, pytest_args = parse_args(argv)
    envs = [env.strip() for env in args.envs.split(",") if env.strip()]
    if not envs:
        sys.exit("--envs names no environment")

    say(f"Project: {ROOT}")
    python = ensure_tox()

    command: list[str | Path] = [python, "-m", "tox", "run", "-c", ROOT / "tox.ini"]
    command += ["-e", ",".join(envs)]
    if args.recreate:
        command.append("--recreate")
    if pytest_args:
        command += ["--", *pytest_args]
    say(f"Running {len(envs)} environment(s): {', '.join(envs)}")
    say(show(command))
    try:
        returncode = subprocess.run(
            [str(part) for part in command], cwd=ROOT, check=False
        ).returncode
    except KeyboardInterrupt:
        return 130
    if returncode == 0:
        say(f"All passed: {', '.join(envs)}")
    else:
        say(f"FAILED (tox exited with {returncode}); see the summary above")
    if any(env.startswith("synapse-") for env in envs):
        for line in skipped_suites():
            say(f"Skipped on this machine: {line}")
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
