#!/usr/bin/env python3
"""Run Synapse's own tests of cross-signing, UIA and device lists, without and then with the
module loaded into every homeserver they build: `tox run -e synapse-upstream`.

Synapse's source distribution on PyPI ships its `tests/` package. This script fetches it for
Synapse 1.163.2, which must be the installed release, unpacks only `tests/` (Synapse's own
`synapse/` source beside it would shadow the installed package and its compiled Rust
extension), and runs the selected test modules with Twisted's trial, each run in a process
of its own:

1. without the module: every test must pass (or be skipped by Synapse itself);
2. with the module, loaded as `homeserver.yaml` would load it (`modules:`, default
   configuration) into every homeserver the tests build: every test must pass, except those
   listed in `tests/upstream/deviations.txt`, where the module documents a different answer,
   and in `tests/upstream/known_bugs.txt`, bugs of the module not fixed yet. A listed test
   is run as trial's "todo": it must fail, and a listed test that passes fails the run, so
   the lists stay true.

    python tools/upstream_tests.py                        # both runs, the default selection
    python tools/upstream_tests.py --mode with tests.rest.client.test_keys
    python tools/upstream_tests.py --cache /tmp/upstream  # where the sdist is kept

The exit status is non-zero when a run fails: a test fails without the module, a test outside
the lists fails with it, a listed test passes or did not run, or a run did not finish.

The sdist is fetched with the package index's JSON API (PEP 691), the protocol pip itself
uses, and checked against the hash pinned below: `pip download --no-binary` cannot fetch it,
as it builds the package's metadata first, which for Synapse needs the Rust toolchain and
crates.io. `PIP_INDEX_URL` is honoured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SYNAPSE_VERSION = "1.163.2"
SDIST = f"matrix_synapse-{SYNAPSE_VERSION}.tar.gz"
SDIST_SHA256 = "4583f1cb8ae6e257c67b752148c3f5ec16ccf7d6cc5d8375d88a14ac20f8effe"
DEFAULT_INDEX = "https://pypi.org/simple"

# Synapse's test modules that exercise what the module replaces or hooks into: the upload
# servlet and UIA, the admin window, delegated auth (MAS), and the device lists whose fetches
# the module observes.
TEST_MODULES = (
    "tests.rest.client.test_keys",
    "tests.handlers.test_e2e_keys",
    "tests.rest.admin.test_user",
    "tests.rest.client.test_auth",
    "tests.handlers.test_oauth_delegation",
    "tests.rest.synapse.mas.test_users",
    "tests.rest.client.test_devices",
    "tests.handlers.test_device",
    "tests.federation.test_federation_devices",
    "tests.federation.test_federation_sender",
    "tests.storage.test_end_to_end_keys",
    # Start-up, and shutting a homeserver down so that it can be garbage-collected.
    "tests.app",
)

# Tests that fail with the module: where it documents a different answer, and its bugs not
# fixed yet.
DEVIATIONS = ROOT / "tests" / "upstream" / "deviations.txt"
KNOWN_BUGS = ROOT / "tests" / "upstream" / "known_bugs.txt"
LISTS = (DEVIATIONS, KNOWN_BUGS)
MODULE = "synapse_xsign_uia.CrossSigningUIAModule"

WITHOUT, WITH = "without", "with"
MODES = (WITHOUT, WITH)

PASS, SKIP, FAIL, ERROR = "pass", "skip", "fail", "error"
EXPECTED_FAILURE, UNEXPECTED_SUCCESS = "expected_failure", "unexpected_success"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


# --- The sdist ------------------------------------------------------------------------------


def sdist_url(index: str) -> str:
    """The download URL of the sdist, from the index's JSON API, checked against the pin."""
    listing_url = f"{index.rstrip('/')}/matrix-synapse/"
    request = urllib.request.Request(
        listing_url,
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    for entry in listing["files"]:
        if entry["filename"] == SDIST:
            published = entry.get("hashes", {}).get("sha256")
            if published is not None and published != SDIST_SHA256:
                raise SystemExit(
                    f"{index} publishes {SDIST} with sha256 {published}, not {SDIST_SHA256}"
                )
            return urllib.parse.urljoin(listing_url, str(entry["url"]))
    raise SystemExit(f"{index} has no {SDIST}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    """The sdist in `cache`, downloaded unless it is already there (with the pinned hash)."""
    path = cache / SDIST
    if path.exists() and sha256_of(path) == SDIST_SHA256:
        say(f"Reusing {path}")
        return path
    index = os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    url = sdist_url(index)
    say(f"Downloading {url}")
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with urllib.request.urlopen(url, timeout=300) as response, partial.open("wb") as f:
        shutil.copyfileobj(response, f)
    if (got := sha256_of(partial)) != SDIST_SHA256:
        partial.unlink()
        raise SystemExit(f"{url} has sha256 {got}, not {SDIST_SHA256}")
    partial.replace(path)
    return path


def unpack_tests(sdist: Path, workdir: Path) -> None:
    """Unpack only the sdist's `tests/` into `workdir/tests`, replacing what was there."""
    prefix = f"{SDIST.removesuffix('.tar.gz')}/"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            name = member.name.removeprefix(prefix)
            if not name.startswith("tests/") or not (member.isfile() or member.isdir()):
                continue
            if ".." in Path(name).parts or Path(name).is_absolute():
                raise SystemExit(f"{sdist}: unsafe path {member.name}")
            member.name = name
            members.append(member)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(workdir, members=members, filter="data")
        else:
            tar.extractall(workdir, members=members)
    if not (workdir / "tests" / "unittest.py").exists():
        raise SystemExit(f"{sdist} has no tests/unittest.py")


# --- The lists of tests expected to fail with the module ------------------------------------


@dataclass(frozen=True)
class Listed:
    """A test expected to fail with the module, the list that says so, and why."""

    test_id: str
    path: Path
    reason: str

    @property
    def kind(self) -> str:
        return "known module bug" if self.path == KNOWN_BUGS else "documented deviation"


def read_list(path: Path) -> list[Listed]:
    """One test a line: the trial test ID, whitespace, the reason; lines starting with `#`
    are comments."""
    listed = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        test_id, *reason = line.split(None, 1)
        if not reason:
            raise SystemExit(f"{path}:{number}: {test_id} has no reason")
        listed.append(Listed(test_id, path, reason[0]))
    return listed


def read_lists(paths: Sequence[Path] = LISTS) -> dict[str, Listed]:
    expected: dict[str, Listed] = {}
    for path in paths:
        for entry in read_list(path):
            if entry.test_id in expected:
                raise SystemExit(f"{entry.test_id} is listed twice ({path.name})")
            expected[entry.test_id] = entry
    return expected


def selected(test_id: str, names: Sequence[str]) -> bool:
    return any(test_id == name or test_id.startswith(f"{name}.") for name in names)


# --- One run, in a child process ------------------------------------------------------------


@dataclass
class ModuleRecord:
    """What the module did in this process: the homeservers it was constructed for, and its
    start-up self-check's failures (which stop the homeserver) not yet reported."""

    homeservers: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    self_check_failures: list[str] = field(default_factory=list)


def load_module_into_every_homeserver() -> ModuleRecord:
    """Have every homeserver configuration list the module under `modules:` with its default
    configuration, as `homeserver.yaml` would: Synapse's test harness then constructs it,
    with the homeserver's module API, when it builds the homeserver
    (`tests.server.setup_test_homeserver`), before the test registers any servlet."""
    from synapse.config.modules import ModulesConfig
    from synapse.util.module_loader import load_module

    from synapse_xsign_uia import CrossSigningUIAModule

    record = ModuleRecord()
    native_read_config = ModulesConfig.read_config

    def read_config(self: ModulesConfig, config: Any, **kwargs: Any) -> None:
        native_read_config(self, config, **kwargs)
        if not any(module is CrossSigningUIAModule for module, _ in self.loaded_modules):
            self.loaded_modules.append(
                load_module({"module": MODULE, "config": {}}, ("modules", "<synapse_xsign_uia>"))
            )

    ModulesConfig.read_config = read_config  # type: ignore[method-assign]

    native_init = CrossSigningUIAModule.__init__
    native_fail = CrossSigningUIAModule._fail

    def __init__(self: CrossSigningUIAModule, config: Any, api: Any) -> None:
        native_init(self, config, api)
        record.homeservers.add(api._hs)

    # The test reactor's `stop` only sets a flag (which `reactor.run()` in Synapse's harness
    # sets as well), so a failed self-check would go unnoticed: record it, to fail the test.
    def _fail(self: CrossSigningUIAModule, reason: str) -> None:
        record.self_check_failures.append(reason)
        native_fail(self, reason)

    CrossSigningUIAModule.__init__ = __init__  # type: ignore[method-assign]
    CrossSigningUIAModule._fail = _fail  # type: ignore[method-assign]
    return record


def iterate_tests(suite: Any) -> Iterator[Any]:
    try:
        children = iter(suite)
    except TypeError:
        yield suite
        return
    for child in children:
        yield from iterate_tests(child)


def run_child(mode: str, names: Sequence[str], results_path: Path) -> int:
    """Run the tests with trial in this process (the working directory holds `tests/`),
    and write each test's outcome to `results_path`."""
    sys.path.insert(0, os.getcwd())
    import synapse

    if Path(synapse.__file__).resolve().is_relative_to(Path.cwd().resolve()):
        raise SystemExit(f"synapse is imported from {synapse.__file__}, not the installed one")

    from twisted.trial import reporter, runner

    # Trial's reporters have no type hints.
    tree_reporter: Any = reporter.TreeReporter

    record = load_module_into_every_homeserver() if mode == WITH else None
    expected = read_lists() if mode == WITH else {}
    outcomes: dict[str, str] = {}

    class Recorder(tree_reporter):  # type: ignore[misc]
        """Trial's usual reporter, which also records each test's outcome, and fails a test
        whose homeserver was built without the module, or where its self-check failed."""

        def _record(self, test: Any, outcome: str) -> None:
            outcomes[test.id()] = outcome

        def addSuccess(self, test: Any) -> None:
            self._record(test, PASS)
            super().addSuccess(test)

        def addFailure(self, test: Any, fail: Any) -> None:
            self._record(test, FAIL)
            super().addFailure(test, fail)

        def addError(self, test: Any, error: Any) -> None:
            self._record(test, ERROR)
            super().addError(test, error)

        def addSkip(self, test: Any, reason: Any) -> None:
            self._record(test, SKIP)
            super().addSkip(test, reason)

        def addExpectedFailure(self, test: Any, error: Any, todo: Any = None) -> None:
            self._record(test, EXPECTED_FAILURE)
            super().addExpectedFailure(test, error, todo)

        def addUnexpectedSuccess(self, test: Any, todo: Any = None) -> None:
            self._record(test, UNEXPECTED_SUCCESS)
            super().addUnexpectedSuccess(test, todo)

        def stopTest(self, test: Any) -> None:
            problem = None
            if record is not None:
                hs = getattr(test, "hs", None)
                if hs is not None and hs not in record.homeservers:
                    problem = "the test's homeserver was built without the module"
                elif record.self_check_failures:
                    problem = f"the module's self-check failed: {record.self_check_failures}"
                record.self_check_failures.clear()
            if problem is not None and outcomes.get(test.id()) in (PASS, EXPECTED_FAILURE):
                try:
                    raise AssertionError(problem)
                except AssertionError:
                    self.addError(test, sys.exc_info())
            super().stopTest(test)

    suite = runner.TestLoader().loadByNames(list(names), recurse=True)
    for test in iterate_tests(suite):
        entry = expected.get(test.id())
        if entry is None:
            continue
        if hasattr(test, "getTodo"):
            # Trial's test cases: a failure is expected, with the reason shown.
            test.todo = f"{entry.kind}: {entry.reason}"
        else:
            # The standard library's, which trial runs too: `unittest.expectedFailure`.
            setattr(test, "__unittest_expecting_failure__", True)  # noqa: B010
    trial = runner.TrialRunner(Recorder, workingDirectory=f"_trial_temp_{mode}")
    trial.run(suite)
    results_path.write_text(json.dumps(outcomes, indent=1, sort_keys=True), encoding="utf-8")
    return 0


# --- Both runs, judged ----------------------------------------------------------------------


@dataclass
class Verdict:
    mode: str
    outcomes: dict[str, str]
    seconds: float
    problems: list[str] = field(default_factory=list)

    def count(self, *kinds: str) -> int:
        return sum(1 for outcome in self.outcomes.values() if outcome in kinds)

    def summary(self) -> str:
        parts = [
            f"{len(self.outcomes)} tests",
            f"{self.count(PASS)} passed",
            f"{self.count(SKIP)} skipped",
        ]
        if self.mode == WITH:
            parts.append(f"{self.count(EXPECTED_FAILURE)} failed as listed")
        parts.append(f"{self.count(FAIL, ERROR)} failed")
        if self.count(UNEXPECTED_SUCCESS):
            parts.append(f"{self.count(UNEXPECTED_SUCCESS)} listed but passed")
        return f"{self.mode} the module: {', '.join(parts)} ({self.seconds:.0f}s)"


def judge(
    mode: str,
    outcomes: dict[str, str],
    seconds: float,
    names: Sequence[str],
    expected: dict[str, Listed],
) -> Verdict:
    verdict = Verdict(mode, outcomes, seconds)
    lists = " or ".join(path.name for path in LISTS)
    for test_id, outcome in sorted(outcomes.items()):
        if outcome in (FAIL, ERROR):
            if mode == WITHOUT:
                verdict.problems.append(f"{test_id}: fails without the module")
            else:
                verdict.problems.append(
                    f"{test_id}: fails with the module and is not listed in {lists}"
                )
        elif outcome == UNEXPECTED_SUCCESS:
            verdict.problems.append(
                f"{test_id}: listed in {expected[test_id].path.name} but passes: "
                "remove it from the list"
            )
    if mode == WITH:
        for test_id, entry in sorted(expected.items()):
            if selected(test_id, names) and test_id not in outcomes:
                verdict.problems.append(
                    f"{test_id}: listed in {entry.path.name} but did not run (renamed?)"
                )
    if not outcomes:
        verdict.problems.append("no test ran")
    return verdict


def run_mode(
    mode: str, workdir: Path, names: Sequence[str], expected: dict[str, Listed]
) -> Verdict:
    results = workdir / f"results-{mode}.json"
    results.unlink(missing_ok=True)
    say(f"Synapse's tests {mode} the module: {' '.join(names)}")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode]
    command += ["--results", str(results), "--", *names]
    started = time.monotonic()
    returncode = subprocess.run(command, cwd=workdir, check=False).returncode
    seconds = time.monotonic() - started
    if returncode != 0 or not results.exists():
        verdict = Verdict(mode, {}, seconds)
        verdict.problems.append(f"the run did not finish (exit status {returncode})")
        return verdict
    outcomes = json.loads(results.read_text(encoding="utf-8"))
    return judge(mode, outcomes, seconds, names, expected)


def installed_synapse() -> str:
    try:
        return metadata.version("matrix-synapse")
    except metadata.PackageNotFoundError:
        raise SystemExit("matrix-synapse is not installed in this environment") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run Synapse's own tests without and with the module.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / ".tox" / ".synapse-upstream",
        help="where the sdist is kept and its tests unpacked (default: .tox/.synapse-upstream)",
    )
    parser.add_argument(
        "--mode",
        choices=(*MODES, "both"),
        default="both",
        help="run the tests without the module, with it, or both (the default)",
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "tests",
        nargs="*",
        help="trial test names (modules, classes or tests; default: the selection above)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    names: list[str] = args.tests or list(TEST_MODULES)
    if args.child is not None:
        return run_child(args.child, names, args.results)

    if (version := installed_synapse()) != SYNAPSE_VERSION:
        raise SystemExit(
            f"Synapse {version} is installed; these are the tests of {SYNAPSE_VERSION}, which "
            "must run against the same release"
        )
    cache: Path = args.cache.resolve()
    sdist = fetch_sdist(cache)
    workdir = cache / f"synapse-{SYNAPSE_VERSION}"
    unpack_tests(sdist, workdir)
    expected = read_lists()

    modes = MODES if args.mode == "both" else (args.mode,)
    verdicts = [run_mode(mode, workdir, names, expected) for mode in modes]

    listed = ", ".join(
        f"{sum(1 for entry in expected.values() if entry.path == path)} in {path.name}"
        for path in LISTS
    )
    say(f"Synapse {SYNAPSE_VERSION}'s own tests (expected to fail with the module: {listed})")
    for verdict in verdicts:
        say(verdict.summary())
        for problem in verdict.problems:
            print(f"    {problem}", flush=True)
    failed = any(verdict.problems for verdict in verdicts)
    say("FAILED" if failed else "All as expected")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
