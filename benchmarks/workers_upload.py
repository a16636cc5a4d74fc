"""The cross-signing key upload on a deployment with workers, native Synapse against Synapse
with the module.

The endpoint is `POST /_matrix/client/v3/keys/device_signing/upload`.

Starts two deployments side by side with the same configuration, one of them with the module
in every process: each is a private PostgreSQL cluster, a Redis server, a Synapse main process
and one `generic_worker` with a client listener (`tests/harness/workers.py`). Users are
registered and keys generated outside the timed regions. Synapse serves this endpoint on
workers from 1.135; before that only the main process does, and the benchmark then sends
every request to the main process and says so.

Phases:
  latency  the four paths of `upload_latency.py` (identical_reupload, first_upload,
           uia_challenge, replacement), each through the worker and through the main
           process, native and module back to back, alternating which goes first each round
  storm    `--storm-users` users per side each make their first upload (master,
           self-signing and user-signing keys) from `--storm-clients` concurrent clients,
           requests spread round-robin over the processes that serve the endpoint:
           throughput, latency, errors, and the CPU time per upload of each process. The
           users run in legs, one side at a time, in `--storm-blocks` blocks ordered
           native-module-module-native and the reverse in turn
  race     as the storm (`--race-users`, one block), but every user sends its first
           upload twice at once, with two different key sets, to two processes where two
           serve the endpoint; afterwards each user's stored keys are read back with
           `/keys/query` and compared with the answers
  dbwork   with `pg_stat_statements` and `pg_stat_database`: statements, transactions and
           PostgreSQL's execution time per request of each path, as the database counted
           them, with what the deployment does without requests subtracted

Run with the python of the environment that has the Synapse to measure, from the repository
root:

    python benchmarks/workers_upload.py [--rounds N] [--warmup N] [--storm-users N]
                                        [--storm-blocks N] [--storm-clients N]
                                        [--race-users N] [--dbwork-requests N]
                                        [--phases latency,storm,race,dbwork]
                                        [--show-statements] [--nice N] [--json FILE] [--keep]

It needs PostgreSQL, Redis and `matrix-synapse[postgres,redis]`. It prints figures and asserts
nothing about them.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, TypeVar

import attrs
import requests

if __package__ in (None, ""):
    # Run as a script: make the repository root importable for the test harness.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._cpu import cpu_seconds, used_between
from benchmarks._shared import (
    SHARED_EXTRA_CONFIG,
    STOCK_LOG_CONFIG,
    Prepared,
    Replacement,
    add_common_options,
    compare,
    encode,
    password_auth,
    print_comparison,
    quantile,
    timed_post,
)
from tests.harness.client import (
    UPLOAD_PATH,
    CrossSigningKeys,
    User,
    register_user,
)
from tests.harness.parallel import run_parallel
from tests.harness.workers import (
    SynapseProcess,
    WorkerDeployment,
    missing_requirements,
    pg_stat_statements_available,
)

PATHS = ("identical_reupload", "first_upload", "uia_challenge", "replacement")
SIDES = ("native", "module")
T = TypeVar("T")
PHASES = ("latency", "storm", "race", "dbwork")

# Registration goes through the main process (Synapse serves its admin API there only);
# a few threads per side keep the preparation short without crowding two cores.
PREPARE_THREADS = 4

# PostgreSQL 15 and later flush an idle backend's counters to `pg_stat_database` within 10 s
# of its last transaction; reading them sooner misses part of the work.
STATS_SETTLE_S = 11.0

# The window with no requests from which the background work is measured, on top of the
# settling time: long enough to include Synapse's periodic writes more than once.
IDLE_S = 20.0

# Between storm legs, so that one side's deferred work (client IP batches, cache
# invalidations) has landed before the other side's leg starts.
LEG_GAP_S = 3.0
# After that, and before the first leg (the users were just registered, on both sides at
# once), the legs wait until both deployments are quiet: together under this share of one
# core over a second, for at most `QUIET_WAIT_S`.
QUIET_SHARE = 0.1
QUIET_WAIT_S = 60.0

TRANSACTION_CONTROL = re.compile(
    r"^\s*(BEGIN|COMMIT|ROLLBACK|START\s+TRANSACTION|END|SAVEPOINT|RELEASE)\b", re.IGNORECASE
)
# Session settings: psycopg2 sends `SET default_transaction_isolation` each time Synapse
# switches a connection into or out of autocommit for a statement outside a transaction.
SESSION_SETTING = re.compile(r"^\s*(SET|RESET|SHOW)\b", re.IGNORECASE)


# The deployments.


@attrs.define
class Side:
    """One deployment: native Synapse or Synapse with the module."""

    name: str
    deployment: WorkerDeployment
    # The processes that serve the upload endpoint, the worker first when it does.
    serving: list[SynapseProcess] = attrs.field(factory=list)

    @property
    def main_url(self) -> str:
        return self.deployment.main.base_url

    def register(self) -> User:
        return register_user(self.main_url, self.deployment.shared_secret)


def make_side(name: str, args: argparse.Namespace) -> Side:
    deployment = WorkerDeployment(
        {},
        dict(SHARED_EXTRA_CONFIG),
        workers=1,
        with_module=name == "module",
        pg_stat_statements="dbwork" in args.phases,
        log_config_template=None if args.unbuffered_log else STOCK_LOG_CONFIG,
    )
    return Side(name, deployment)


def for_each_side(sides: dict[str, Side], job: Callable[[Side], T]) -> dict[str, T]:
    """`job` for each side, the sides side by side; what it returns, by side name."""
    results: dict[str, T] = {}

    def one(name: str) -> None:
        results[name] = job(sides[name])

    run_parallel([functools.partial(one, name) for name in SIDES])
    return results


def find_serving(side: Side) -> None:
    """Ask each worker for the endpoint with an empty body: a worker that does not serve it
    answers 404 (`M_UNRECOGNIZED`)."""
    user = side.register()
    side.serving = []
    for worker in side.deployment.workers:
        response = requests.post(
            f"{worker.base_url}{UPLOAD_PATH}",
            json={},
            headers={"Authorization": f"Bearer {user.access_token}"},
            timeout=30,
        )
        if response.status_code != 404:
            side.serving.append(worker)
    side.serving.append(side.deployment.main)


def wait_for_background_updates(side: Side, timeout: float = 900) -> float:
    """Wait until Synapse has run the background updates of its new database, which take a
    few minutes of database work after the first start; the seconds waited."""
    import psycopg2

    started = time.monotonic()
    connection = psycopg2.connect(
        host="127.0.0.1", port=side.deployment.postgres.port, user="postgres", dbname="synapse"
    )
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            while time.monotonic() - started < timeout:
                cursor.execute("SELECT count(*) FROM background_updates")
                row = cursor.fetchone()
                if row is not None and row[0] == 0:
                    return time.monotonic() - started
                time.sleep(1)
    finally:
        connection.close()
    raise RuntimeError(f"{side.name}: background updates still pending after {timeout}s")


def module_origin(process: SynapseProcess) -> str:
    """Where the running process's interpreter imports the module from: the same interpreter
    with the process's own environment (`PYTHONPATH` included) and working directory."""
    assert process.process is not None
    raw = Path(f"/proc/{process.process.pid}/environ").read_bytes()
    env = dict(
        entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry
    )
    result = subprocess.run(
        [sys.executable, "-c", "import synapse_xsign_uia as m; print(m.__file__)"],
        env=env,
        cwd=process.cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return str(Path(result.stdout.strip()).parent)


def loaded_in(process: SynapseProcess, timeout: float = 15) -> bool:
    """Whether the process logged that the module loaded; the stock logging set-up writes
    INFO lines within 5 s."""
    deadline = time.monotonic() + timeout
    while True:
        if any("loaded (with workers)" in line for line in process.log_lines("synapse_xsign_uia")):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def describe(sides: dict[str, Side]) -> dict[str, Any]:
    """Check and print what each side runs: which processes serve the endpoint, whether the
    module is loaded where it should be (and not elsewhere), and from where."""
    report: dict[str, Any] = {}
    for name, side in sides.items():
        processes = side.deployment.processes
        loaded = {p.name: loaded_in(p, timeout=15 if name == "module" else 0) for p in processes}
        origins = {p.name: module_origin(p) for p in processes}
        report[name] = {
            "serving": [p.name for p in side.serving],
            "module_loaded": loaded,
            "module_importable_from": origins,
            "directory": str(side.deployment.directory),
        }
        state = ", ".join(f"{p}: {'loaded' if ok else 'not loaded'}" for p, ok in loaded.items())
        print(f"{name}: serving {', '.join(report[name]['serving'])}; module {state}")
        if name == "module":
            for process, origin in origins.items():
                print(f"  {process} imports synapse_xsign_uia from {origin}")
    return report


def register_many(side: Side, count: int, job: Callable[[User], Any]) -> list[Any]:
    """Register `count` users on `side` and turn each into what `job` returns, a few at a
    time."""

    def one(_: int) -> Any:
        return job(side.register())

    with ThreadPoolExecutor(PREPARE_THREADS) as pool:
        return list(pool.map(one, range(count)))


def with_keys(user: User) -> tuple[User, dict[str, Any]]:
    """The user with its first keys stored (through the main process), and their body."""
    body = user.keys().body()
    response = user.upload_with_uia(body)
    response.raise_for_status()
    return user, body


def fresh(user: User) -> Prepared:
    return Prepared(user.access_token, encode(user.keys().body()))


def replacement(user: User) -> Replacement:
    user, _ = with_keys(user)
    return Replacement(user.access_token, user.user_id, user.password, user.keys().body())


# Latency.


@attrs.define
class Endpoint:
    """One process of one side, and the requests prepared for it."""

    url: str
    session: requests.Session = attrs.field(factory=requests.Session)
    identical: Prepared | None = None
    challenge: Prepared | None = None
    fresh: list[Prepared] = attrs.field(factory=list)
    replacements: list[Replacement] = attrs.field(factory=list)
    samples: dict[str, list[float]] = attrs.field(factory=lambda: {p: [] for p in PATHS})
    statuses: dict[str, Counter[int]] = attrs.field(factory=lambda: {p: Counter() for p in PATHS})

    def send(self, prepared: Prepared) -> tuple[float, int]:
        elapsed, response = timed_post(self.session, self.url, prepared.token, prepared.body)
        return elapsed, response.status_code

    def replace(self, replacement: Replacement) -> tuple[float, int]:
        """The challenge, then the password in its session: the two requests' time."""
        first, response = timed_post(
            self.session, self.url, replacement.token, encode(replacement.body)
        )
        if response.status_code != 401:
            return first, response.status_code
        auth = password_auth(replacement, response.json()["session"])
        body = encode({**replacement.body, "auth": auth})
        second, response = timed_post(self.session, self.url, replacement.token, body)
        return first + second, response.status_code

    def run(self, path: str) -> tuple[float, int]:
        if path == "identical_reupload":
            assert self.identical is not None
            return self.send(self.identical)
        if path == "uia_challenge":
            assert self.challenge is not None
            return self.send(self.challenge)
        if path == "first_upload":
            return self.send(self.fresh.pop())
        return self.replace(self.replacements.pop())


def prepare_endpoint(side: Side, process: SynapseProcess, fresh_users: int) -> Endpoint:
    endpoint = Endpoint(f"{process.base_url}{UPLOAD_PATH}")
    user, body = with_keys(side.register())
    endpoint.identical = Prepared(user.access_token, encode(body))
    # The challenge user has keys stored and sends another valid set for itself.
    user, _ = with_keys(side.register())
    endpoint.challenge = Prepared(user.access_token, encode(CrossSigningKeys(user.user_id).body()))
    endpoint.fresh = register_many(side, fresh_users, fresh)
    endpoint.replacements = register_many(side, fresh_users, replacement)
    # Warm the connection so that no timed request opens one.
    endpoint.session.get(f"{process.base_url}/health", timeout=30).raise_for_status()
    return endpoint


def run_latency(sides: dict[str, Side], args: argparse.Namespace) -> dict[str, Any]:
    processes = [p.name for p in sides["native"].serving]
    print(f"\n== latency: through {' and '.join(processes)}")
    if len(processes) == 1:
        print(
            "   (the worker does not serve this endpoint on this Synapse: it answers 404; "
            "measured through the main process only)"
        )
    fresh_users = args.rounds + args.warmup
    started = time.monotonic()
    endpoints = for_each_side(
        sides,
        lambda side: {p.name: prepare_endpoint(side, p, fresh_users) for p in side.serving},
    )
    print(
        f"   {fresh_users} rounds' users prepared per process and side in "
        f"{time.monotonic() - started:.0f}s"
    )

    pause = args.pause / 1000
    load_before = os.getloadavg()
    timed = time.monotonic()
    for i in range(args.warmup + args.rounds):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        for path in PATHS:
            for process in processes:
                for name in order:
                    endpoint = endpoints[name][process]
                    elapsed, status = endpoint.run(path)
                    if i >= args.warmup:
                        endpoint.samples[path].append(elapsed)
                        endpoint.statuses[path][status] += 1
                    if pause:
                        time.sleep(pause)
    load_after = os.getloadavg()
    print(
        f"   {args.rounds} rounds after {args.warmup} warm-up rounds in "
        f"{time.monotonic() - timed:.0f}s; load average (1 min) {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after"
    )

    figures: dict[str, Any] = {}
    for process in processes:
        rows = {
            path: compare(
                endpoints["native"][process].samples[path],
                endpoints["module"][process].samples[path],
                endpoints["native"][process].statuses[path],
                endpoints["module"][process].statuses[path],
            )
            for path in PATHS
        }
        for path, row in rows.items():
            row["ratio_median_by_order"] = by_order(
                endpoints["native"][process].samples[path],
                endpoints["module"][process].samples[path],
                args.warmup,
            )
        figures[process] = rows
        print(f"\nthrough {process}:")
        print_comparison(rows)
        print(
            "ratio of medians by the side that went first in the round (native first / "
            "module first): "
            + "; ".join(
                f"{path} {row['ratio_median_by_order']['native_first']:.3f} / "
                f"{row['ratio_median_by_order']['module_first']:.3f}"
                for path, row in rows.items()
            )
        )
    return {
        "processes": processes,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "pause_ms": args.pause,
        "load_average_1min": [load_before[0], load_after[0]],
        "paths": figures,
        "samples_ms": {
            name: {
                process: {path: [x * 1000 for x in e.samples[path]] for path in PATHS}
                for process, e in by_process.items()
            }
            for name, by_process in endpoints.items()
        },
    }


def by_order(native: Sequence[float], module: Sequence[float], warmup: int) -> dict[str, float]:
    """The ratio of medians over the rounds in which native Synapse sent first, and over
    those in which the module did. Far apart, they tell that the work one side leaves
    running after a request (replication, background writes) lands in the other side's
    next timed request: a longer `--pause` lets it end."""
    ratios = {}
    for name, parity in (("native_first", 0), ("module_first", 1)):
        rounds = [i for i in range(len(native)) if (i + warmup) % 2 == parity]
        ratios[name] = statistics.median(module[i] for i in rounds) / statistics.median(
            native[i] for i in rounds
        )
    return ratios


# Storm and race.


@attrs.frozen
class Sent:
    """One request of a storm: the user's index, which of its requests, the answer."""

    user: int
    attempt: int
    status: int
    elapsed: float


@attrs.define
class Leg:
    """Part of a storm on one side: its requests and how long they took from the first to
    the last answer."""

    sent: list[Sent]
    duration: float
    # CPU seconds by process (`client` for the benchmark's own), set by `alternating`.
    cpu_s: dict[str, float] = attrs.field(factory=dict)


def _sessions(side: Side) -> list[requests.Session]:
    sessions = []
    for process in side.serving:
        session = requests.Session()
        session.get(f"{process.base_url}/health", timeout=30).raise_for_status()
        sessions.append(session)
    return sessions


def storm_leg(side: Side, bodies: Sequence[Prepared], clients: int) -> Leg:
    """Every body once, `clients` at a time; request `i` goes to serving process `i` modulo
    their number."""
    urls = [f"{p.base_url}{UPLOAD_PATH}" for p in side.serving]
    counter = itertools.count()
    lock = threading.Lock()
    sent: list[Sent] = []
    start = threading.Barrier(clients + 1)

    def client() -> None:
        sessions = _sessions(side)
        start.wait()
        while True:
            with lock:
                i = next(counter)
            if i >= len(bodies):
                return
            process = i % len(urls)
            elapsed, response = timed_post(
                sessions[process], urls[process], bodies[i].token, bodies[i].body, timeout=300
            )
            with lock:
                sent.append(Sent(i, 0, response.status_code, elapsed))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return Leg(sent, time.perf_counter() - began)


def race_leg(side: Side, pairs: Sequence[tuple[Prepared, Prepared]], clients: int) -> Leg:
    """Both bodies of each pair at once, from two clients released together; with several
    serving processes the two go to different ones. `clients` counts the clients, two per
    pair."""
    urls = [f"{p.base_url}{UPLOAD_PATH}" for p in side.serving]
    counter = itertools.count()
    lock = threading.Lock()
    sent: list[Sent] = []
    teams = max(1, clients // 2)
    start = threading.Barrier(2 * teams + 1)

    def team() -> tuple[Callable[[], None], Callable[[], None]]:
        together = threading.Barrier(2)
        current: list[int] = [0]

        def member(attempt: int) -> None:
            sessions = _sessions(side)
            start.wait()
            while True:
                if attempt == 0:
                    with lock:
                        current[0] = next(counter)
                # Both take the user the first one drew, and send at the same moment.
                together.wait()
                i = current[0]
                if i >= len(pairs):
                    return
                process = (i + attempt) % len(urls)
                prepared = pairs[i][attempt]
                elapsed, response = timed_post(
                    sessions[process], urls[process], prepared.token, prepared.body, timeout=300
                )
                with lock:
                    sent.append(Sent(i, attempt, response.status_code, elapsed))
                # Neither draws the next user before both have sent for this one.
                together.wait()

        return (lambda: member(0)), (lambda: member(1))

    threads = [threading.Thread(target=member) for _ in range(teams) for member in team()]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return Leg(sent, time.perf_counter() - began)


# The order of the sides' legs in a block of the storm or the race; the blocks alternate it
# with its reverse, so that drift during the phase falls on both sides alike.
ABBA = ("native", "module", "module", "native")


def block_order(block: int) -> tuple[str, ...]:
    return ABBA if block % 2 == 0 else ABBA[::-1]


def alternating(
    sides: dict[str, Side],
    parts: dict[str, Sequence[Any]],
    run: Callable[[Side, Any], Leg],
    blocks: int,
) -> list[tuple[str, Leg]]:
    """Each side's parts, one leg each, in `blocks` blocks of four legs, never two legs at
    once, each once both deployments are quiet; the legs with their side, in the order they
    ran. Each leg counts the CPU time its side's processes and the clients used from its
    start to the start of the next leg."""
    taken = dict.fromkeys(SIDES, 0)
    legs: list[tuple[str, Leg]] = []
    waits = [wait_until_quiet(sides)]
    for block in range(blocks):
        for name in block_order(block):
            deployment = sides[name].deployment
            before, client_before = cpu_seconds(deployment), time.process_time()
            leg = run(sides[name], parts[name][taken[name]])
            time.sleep(LEG_GAP_S)
            waits.append(LEG_GAP_S + wait_until_quiet(sides))
            leg.cpu_s = used_between(before, cpu_seconds(deployment))
            leg.cpu_s["client"] = time.process_time() - client_before
            taken[name] += 1
            legs.append((name, leg))
    print(
        f"   waited {waits[0]:.0f}s for both deployments to be quiet before the first leg, "
        f"{min(waits[1:]):.0f}s to {max(waits[1:]):.0f}s after each leg"
    )
    return legs


def wait_until_quiet(sides: dict[str, Side]) -> float:
    """Wait until the deployments' processes together use less than `QUIET_SHARE` of a core
    over a second (or `QUIET_WAIT_S` has passed); how long that took."""
    started = time.monotonic()

    def used() -> float:
        return sum(sum(cpu_seconds(side.deployment).values()) for side in sides.values())

    while time.monotonic() - started < QUIET_WAIT_S:
        before = used()
        time.sleep(1.0)
        if used() - before < QUIET_SHARE:
            break
    return time.monotonic() - started


def of_side(legs: Sequence[tuple[str, Leg]], name: str) -> list[Leg]:
    return [leg for side, leg in legs if side == name]


def chunks(items: Sequence[Any], count: int) -> list[Sequence[Any]]:
    """`items` in `count` consecutive parts whose sizes differ by at most one."""
    size, extra = divmod(len(items), count)
    parts, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        parts.append(items[start:end])
        start = end
    return parts


def rate(legs: Sequence[Leg]) -> float:
    """Requests answered per second over `legs`."""
    return sum(len(leg.sent) for leg in legs) / sum(leg.duration for leg in legs)


def leg_figures(legs: Sequence[Leg], uploads: int) -> dict[str, Any]:
    sent = [s for leg in legs for s in leg.sent]
    duration = sum(leg.duration for leg in legs)
    latencies = [s.elapsed for s in sent]
    statuses = Counter(s.status for s in sent)
    return {
        "requests": len(sent),
        "uploads_per_s": uploads / duration,
        "requests_per_s": rate(legs),
        "duration_s": duration,
        "p50_ms": quantile(latencies, 0.5) * 1000,
        "p99_ms": quantile(latencies, 0.99) * 1000,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def cpu_per_upload(legs: Sequence[Leg]) -> dict[str, float]:
    """Milliseconds of CPU per upload by process over `legs`, with `total` for the
    deployment's processes (the clients' own apart)."""
    uploads = sum(len({s.user for s in leg.sent}) for leg in legs)
    used: Counter[str] = Counter()
    for leg in legs:
        used.update(leg.cpu_s)
    per_upload = {name: seconds * 1000 / uploads for name, seconds in used.items()}
    per_upload["total"] = sum(v for k, v in per_upload.items() if k != "client")
    return per_upload


def print_cpu(figures: dict[str, Any]) -> None:
    native, module = figures["native"]["cpu_ms_per_upload"], figures["module"]["cpu_ms_per_upload"]
    columns = [k for k in native if k not in ("total", "client")] + ["total", "client"]
    header = f"{'CPU ms per upload':<18}" + "".join(f"{c:>10}" for c in columns)
    print(header)
    print("-" * len(header))
    for name, row in (("native", native), ("module", module)):
        print(f"{name:<18}" + "".join(f"{row[c]:>10.2f}" for c in columns))
    print(
        f"{'module / native':<18}"
        + "".join(f"{module[c] / native[c] if native[c] else float('nan'):>10.3f}" for c in columns)
    )


def run_storm(sides: dict[str, Side], args: argparse.Namespace) -> dict[str, Any]:
    legs_per_side = 2 * args.storm_blocks
    print(
        f"\n== storm: {args.storm_users} first uploads per side in {legs_per_side} legs, "
        f"{args.storm_clients} clients, round-robin over "
        f"{', '.join(p.name for p in sides['native'].serving)}"
    )
    started = time.monotonic()
    prepared = for_each_side(sides, lambda side: register_many(side, args.storm_users, fresh))
    print(f"   users prepared in {time.monotonic() - started:.0f}s")
    load_before = os.getloadavg()
    legs = alternating(
        sides,
        {name: chunks(prepared[name], legs_per_side) for name in SIDES},
        lambda side, part: storm_leg(side, part, args.storm_clients),
        args.storm_blocks,
    )
    print(f"   load average (1 min) {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    figures: dict[str, Any] = {}
    for name in SIDES:
        figures[name] = leg_figures(of_side(legs, name), args.storm_users)
        figures[name]["cpu_ms_per_upload"] = cpu_per_upload(of_side(legs, name))
    header = (
        f"{'side':<8} {'uploads':>7} {'uploads/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6}  statuses"
    )
    print(header)
    print("-" * len(header))
    for name in SIDES:
        f = figures[name]
        errors = sum(v for k, v in f["statuses"].items() if k != "200")
        statuses = " ".join(f"{k}:{v}" for k, v in f["statuses"].items())
        print(
            f"{name:<8} {f['requests']:>7} {f['uploads_per_s']:>9.1f} {f['p50_ms']:>8.1f} "
            f"{f['p99_ms']:>8.1f} {errors:>6}  {statuses}"
        )
    ratio = figures["module"]["uploads_per_s"] / figures["native"]["uploads_per_s"]
    figures["throughput_ratio"] = ratio
    # Each block's own ratio: its two legs of each side ran within seconds of each other.
    block_ratios = []
    for block in range(args.storm_blocks):
        in_block = legs[4 * block : 4 * block + 4]
        block_ratios.append(rate(of_side(in_block, "module")) / rate(of_side(in_block, "native")))
    figures["block_ratios"] = block_ratios
    print(
        f"(throughput module / native: {ratio:.3f}; by block of four legs: "
        + ", ".join(f"{r:.3f}" for r in block_ratios)
        + f"; median {statistics.median(block_ratios):.3f})"
    )
    # How much the machine drifted during the phase: each leg's own throughput.
    leg_rates = [(name, rate([leg])) for name, leg in legs]
    figures["legs_uploads_per_s"] = leg_rates
    print(
        "(uploads per second of each leg, in the order run: "
        + ", ".join(f"{name} {per_s:.1f}" for name, per_s in leg_rates)
        + ")"
    )
    leg_cpu = [(name, cpu_per_upload([leg])["total"]) for name, leg in legs]
    figures["legs_cpu_ms_per_upload"] = leg_cpu
    print(
        "(CPU ms per upload of each leg's deployment, in the order run: "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in leg_cpu)
        + ")"
    )
    print_cpu(figures)
    return figures


@attrs.frozen
class RaceUser:
    user: User
    bodies: tuple[dict[str, Any], dict[str, Any]]
    prepared: tuple[Prepared, Prepared]


def race_user(user: User) -> RaceUser:
    bodies = (user.keys().body(), user.keys().body())
    return RaceUser(
        user,
        bodies,
        (
            Prepared(user.access_token, encode(bodies[0])),
            Prepared(user.access_token, encode(bodies[1])),
        ),
    )


def public_key(key: dict[str, Any]) -> str:
    return str(next(iter(key["keys"].values())))


def stored_keys(users: Sequence[RaceUser]) -> dict[str, dict[str, str]]:
    """Each user's stored public keys by type, as `/keys/query` through the main process
    answers the user itself (only the user sees its own user-signing key)."""

    def one(race_user: RaceUser) -> tuple[str, dict[str, str]]:
        user = race_user.user
        return user.user_id, {t: public_key(k) for t, k in user.stored_keys().items()}

    with ThreadPoolExecutor(PREPARE_THREADS) as pool:
        return dict(pool.map(one, users))


def race_outcomes(
    users: Sequence[RaceUser], legs: Sequence[Leg], stored: dict[str, dict[str, str]]
) -> dict[str, Any]:
    statuses: dict[int, list[int]] = {}
    for leg in legs:
        for s in leg.sent:
            statuses.setdefault(s.user, [0, 0])[s.attempt] = s.status
    counts: Counter[str] = Counter()
    other_statuses: Counter[int] = Counter()
    for i, user in enumerate(users):
        answers = statuses[i]
        accepted = [attempt for attempt in (0, 1) if answers[attempt] == 200]
        other_statuses.update(s for s in answers if s != 200)
        counts[f"{len(accepted)}_accepted"] += 1
        sets = [
            {
                "master": public_key(body["master_key"]),
                "self_signing": public_key(body["self_signing_key"]),
                "user_signing": public_key(body["user_signing_key"]),
            }
            for body in user.bodies
        ]
        keys = stored[user.user.user_id]
        master = keys.get("master")
        # A 200 whose keys are not the ones stored: an identity the client was told it has,
        # silently replaced.
        counts["accepted_then_lost"] += sum(1 for a in accepted if sets[a]["master"] != master)
        if accepted and all(sets[a]["master"] != master for a in accepted):
            counts["stored_not_from_an_accepted"] += 1
        if keys not in sets:
            counts["stored_keys_mixed_or_missing"] += 1
    return {
        "users": len(users),
        "both_accepted": counts["2_accepted"],
        "one_accepted": counts["1_accepted"],
        "none_accepted": counts["0_accepted"],
        "accepted_then_lost": counts["accepted_then_lost"],
        "stored_not_from_an_accepted": counts["stored_not_from_an_accepted"],
        "stored_keys_mixed_or_missing": counts["stored_keys_mixed_or_missing"],
        "other_statuses": {str(k): v for k, v in sorted(other_statuses.items())},
    }


def run_race(sides: dict[str, Side], args: argparse.Namespace) -> dict[str, Any]:
    serving = [p.name for p in sides["native"].serving]
    where = (
        "one to each of " + " and ".join(serving) if len(serving) > 1 else f"both to {serving[0]}"
    )
    print(
        f"\n== race: {args.race_users} users per side each send two different first uploads "
        f"at once ({where}), {args.storm_clients} clients"
    )
    started = time.monotonic()
    users = for_each_side(sides, lambda side: register_many(side, args.race_users, race_user))
    print(f"   users prepared in {time.monotonic() - started:.0f}s")
    # Each leg numbers its users from 0; the second half's answers are mapped back below.
    halves = {name: chunks(users[name], 2) for name in SIDES}
    load_before = os.getloadavg()
    legs = alternating(
        sides,
        {name: [[u.prepared for u in half] for half in halves[name]] for name in SIDES},
        lambda side, half: race_leg(side, half, args.storm_clients),
        blocks=1,
    )
    print(f"   load average (1 min) {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    # Writes made on the worker reach the main process's caches over replication.
    time.sleep(2)
    figures: dict[str, Any] = {}
    for name in SIDES:
        first, second = of_side(legs, name)
        offset = len(halves[name][0])
        shifted = Leg(
            [Sent(s.user + offset, s.attempt, s.status, s.elapsed) for s in second.sent],
            second.duration,
        )
        stored = stored_keys(users[name])
        figures[name] = {
            **race_outcomes(users[name], [first, shifted], stored),
            **leg_figures([first, second], args.race_users),
        }
    header = (
        f"{'side':<8} {'users':>5} {'both 200':>8} {'one 200':>7} {'no 200':>6} "
        f"{'200 lost':>8} {'stored not a 200':>16} {'mixed/missing':>13} {'users/s':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7}  other statuses"
    )
    print(header)
    print("-" * len(header))
    for name in SIDES:
        f = figures[name]
        others = " ".join(f"{k}:{v}" for k, v in f["other_statuses"].items()) or "-"
        print(
            f"{name:<8} {f['users']:>5} {f['both_accepted']:>8} {f['one_accepted']:>7} "
            f"{f['none_accepted']:>6} {f['accepted_then_lost']:>8} "
            f"{f['stored_not_from_an_accepted']:>16} {f['stored_keys_mixed_or_missing']:>13} "
            f"{f['uploads_per_s']:>7.1f} {f['p50_ms']:>7.1f} {f['p99_ms']:>7.1f}  {others}"
        )
    print(
        "(both 200: two identities accepted for one user; 200 lost: answers 200 whose master "
        "key is not the one stored; stored not a 200: users whose stored master key is from no "
        "request answered 200; mixed/missing: stored keys that are not one request's whole set)"
    )
    return figures


# Database work.


class DatabaseCounters:
    """The counters of one deployment's `synapse` database, read over a connection to another
    database of the cluster, so that reading them adds nothing to what they count."""

    def __init__(self, deployment: WorkerDeployment) -> None:
        import psycopg2

        self.connection = psycopg2.connect(
            host="127.0.0.1", port=deployment.postgres.port, user="postgres", dbname="postgres"
        )
        self.connection.autocommit = True
        # The extension's view answers in the database that has the extension; it counts
        # the statements of every database.
        self._query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.dbid = self._query("SELECT oid FROM pg_database WHERE datname = 'synapse'")[0][0]

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, args or None)
            return list(cursor.fetchall()) if cursor.description else []

    def transactions(self) -> int:
        rows = self._query(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'synapse'"
        )
        return int(rows[0][0])

    def set_autovacuum(self, on: bool) -> None:
        self._query(f"ALTER SYSTEM SET autovacuum = {'on' if on else 'off'}")
        self._query("SELECT pg_reload_conf()")

    def reset_statements(self) -> None:
        self._query("SELECT pg_stat_statements_reset()")

    def statements(self) -> tuple[Counter[str], dict[str, float]]:
        """Each statement's calls, and the milliseconds PostgreSQL spent executing it."""
        rows = self._query(
            "SELECT query, sum(calls), sum(total_exec_time) FROM pg_stat_statements "
            "WHERE dbid = %s GROUP BY query",
            (self.dbid,),
        )
        calls = Counter({str(query): int(n) for query, n, _ in rows})
        return calls, {str(query): float(ms) for query, _, ms in rows}

    def close(self) -> None:
        self.connection.close()


@attrs.define
class Window:
    """What the database counted between two readings."""

    seconds: float
    transactions: int
    statements: Counter[str]
    exec_ms: dict[str, float]

    @property
    def control(self) -> int:
        return sum(n for q, n in self.statements.items() if TRANSACTION_CONTROL.match(q))

    @property
    def settings(self) -> int:
        return sum(n for q, n in self.statements.items() if SESSION_SETTING.match(q))

    @property
    def sql(self) -> int:
        return sum(self.statements.values()) - self.control - self.settings

    def counts(self) -> dict[str, float]:
        return {
            "sql": self.sql,
            "settings": self.settings,
            "transaction_control": self.control,
            "statements": sum(self.statements.values()),
            "transactions": self.transactions,
            "exec_ms": sum(self.exec_ms.values()),
        }


def measure(counters: DatabaseCounters, work: Callable[[], None]) -> Window:
    before = counters.transactions()
    counters.reset_statements()
    started = time.monotonic()
    work()
    time.sleep(STATS_SETTLE_S)
    statements, exec_ms = counters.statements()
    transactions = counters.transactions() - before
    return Window(time.monotonic() - started, transactions, statements, exec_ms)


def run_dbwork(sides: dict[str, Side], args: argparse.Namespace) -> dict[str, Any] | None:
    if not pg_stat_statements_available():
        print("\n== dbwork: left out: this PostgreSQL has no pg_stat_statements extension")
        return None
    k = args.dbwork_requests
    process = {name: side.serving[0] for name, side in sides.items()}
    print(
        f"\n== dbwork: {k} requests of each path through {process['native'].name}, one at a "
        f"time; counted by pg_stat_statements and pg_stat_database, autovacuum off"
    )
    endpoints = for_each_side(sides, lambda side: prepare_endpoint(side, process[side.name], k))
    counters = {name: DatabaseCounters(side.deployment) for name, side in sides.items()}
    windows: dict[str, dict[str, Window]] = {name: {} for name in SIDES}

    def window(name: str, label: str, path: str | None) -> None:
        endpoint = endpoints[name]

        def work() -> None:
            if path is None:
                time.sleep(IDLE_S)
                return
            for _ in range(k):
                _, status = endpoint.run(path)
                endpoint.statuses[path][status] += 1

        windows[name][label] = measure(counters[name], work)

    try:
        for c in counters.values():
            # The earlier phases' inserts would have autovacuum's transactions land in the
            # windows; they are not the requests' work.
            c.set_autovacuum(False)
        time.sleep(STATS_SETTLE_S)
        steps = [("idle_before", None), *((path, path) for path in PATHS), ("idle_after", None)]
        for label, path in steps:
            run_parallel([functools.partial(window, name, label, path) for name in SIDES])
    finally:
        for c in counters.values():
            c.set_autovacuum(True)
            c.close()

    figures: dict[str, Any] = {}
    for name in SIDES:
        idle = [windows[name]["idle_before"], windows[name]["idle_after"]]
        idle_seconds = sum(w.seconds for w in idle)
        rates = {
            kind: sum(w.counts()[kind] for w in idle) / idle_seconds for kind in idle[0].counts()
        }
        entry: dict[str, Any] = {"background_per_s": rates}
        for path in PATHS:
            w = windows[name][path]
            entry[path] = {
                **{
                    kind: (count - rates[kind] * w.seconds) / k
                    for kind, count in w.counts().items()
                },
                "raw": {
                    "seconds": w.seconds,
                    **w.counts(),
                    "statements": dict(w.statements.most_common()),
                    "statement_exec_ms": w.exec_ms,
                },
                "statuses": {
                    str(code): n for code, n in sorted(endpoints[name].statuses[path].items())
                },
            }
        figures[name] = entry

    columns = (
        ("sql", "queries", ".2f"),
        ("settings", "SET", ".2f"),
        ("transaction_control", "B/C/R", ".2f"),
        ("statements", "all", ".2f"),
        ("transactions", "tx", ".2f"),
        ("exec_ms", "exec ms", ".3f"),
    )
    header = f"{'path':<20} {'side':<7} " + " ".join(f"{title:>8}" for _, title, _ in columns)
    print(header)
    print("-" * len(header))
    for path in PATHS:
        for side in SIDES:
            f = figures[side][path]
            cells = " ".join(f"{f[kind]:>8{spec}}" for kind, _, spec in columns)
            print(f"{path if side == SIDES[0] else '':<20} {side:<7} {cells}")
    for name in SIDES:
        b = figures[name]["background_per_s"]
        print(
            f"({name} with no requests, subtracted: {b['sql']:.2f} queries, {b['settings']:.2f} "
            f"SET, {b['transaction_control']:.2f} BEGIN/COMMIT/ROLLBACK, "
            f"{b['transactions']:.2f} transactions, {b['exec_ms']:.3f} ms of execution a second)"
        )
    print(
        "(per request; for replacement per challenge and answer together. queries: statements "
        "other than SET and transaction control; SET: session settings, which psycopg2 sends "
        "when Synapse switches a connection to or from autocommit; B/C/R: BEGIN, COMMIT and "
        "ROLLBACK; all: every statement, each a round trip; tx: committed and rolled-back "
        "transactions of the synapse database, statements outside a transaction block "
        "included; exec ms: time PostgreSQL spent executing the statements)"
    )
    if args.show_statements:
        show_statements(figures, k)
    return {"requests": k, "process": process["native"].name, "paths": figures}


def show_statements(figures: dict[str, Any], k: int) -> None:
    """For each path, the statements whose count per request differs between the sides, with
    the time PostgreSQL spent executing them."""
    for path in PATHS:
        raw = {side: figures[side][path]["raw"] for side in SIDES}
        native, module = (Counter(raw[side]["statements"]) for side in SIDES)
        native_ms, module_ms = (raw[side]["statement_exec_ms"] for side in SIDES)
        print(
            f"\n{path}: calls per request native, module; execution ms per request native, "
            "module; where the calls differ"
        )
        for query in sorted(set(native) | set(module), key=lambda q: -abs(module[q] - native[q])):
            if abs(module[query] - native[query]) / k < 0.1:
                continue
            text = " ".join(query.split())[:90]
            print(
                f"  {native[query] / k:>6.2f} {module[query] / k:>6.2f} "
                f"{native_ms.get(query, 0.0) / k:>7.3f} {module_ms.get(query, 0.0) / k:>7.3f}  "
                f"{text}"
            )


# Running it all.


def source_commit(directory: Path) -> str:
    """The commit the module's source is from, marked when it has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} with uncommitted changes" if dirty else head


@attrs.define
class Run:
    sides: dict[str, Side]
    keep: bool

    def __enter__(self) -> Run:
        try:
            run_parallel([side.deployment.start for side in self.sides.values()])
        except BaseException:
            # The side that started would be left running.
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for side in self.sides.values():
            side.deployment.stop(cleanup=not self.keep)
        if self.keep:
            for name, side in self.sides.items():
                print(f"{name} deployment directory: {side.deployment.directory}")


def parse_phases(text: str) -> list[str]:
    phases = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise argparse.ArgumentTypeError(
            f"phases are a comma-separated list of {', '.join(PHASES)}, not {text!r}"
        )
    return phases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=200, help="timed latency rounds (200)")
    parser.add_argument("--warmup", type=int, default=40, help="untimed latency rounds first (40)")
    parser.add_argument(
        "--pause",
        type=float,
        default=30.0,
        help="milliseconds to wait after each latency request, so that the work one side "
        "leaves running after a request (a write's replication to the worker, say) does not "
        "land in the other side's timed request (default 30)",
    )
    parser.add_argument(
        "--storm-users", type=int, default=1500, help="users per side in the storm (1500)"
    )
    parser.add_argument(
        "--storm-blocks",
        type=int,
        default=3,
        help="blocks of four storm legs, native-module-module-native and the reverse in turn; "
        "each leg has --storm-users / (2 x blocks) users (3)",
    )
    parser.add_argument(
        "--race-users", type=int, default=500, help="users per side in the race (500)"
    )
    parser.add_argument(
        "--storm-clients", type=int, default=32, help="concurrent clients in the storm (32)"
    )
    parser.add_argument(
        "--dbwork-requests", type=int, default=50, help="requests of each path counted (50)"
    )
    parser.add_argument(
        "--show-statements",
        action="store_true",
        help="list the statements whose count per request differs between the sides",
    )
    parser.add_argument(
        "--phases",
        type=parse_phases,
        default=list(PHASES),
        help=f"comma-separated, from {','.join(PHASES)} (default: all)",
    )
    add_common_options(parser, "the deployments")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.storm_clients < 2 or args.storm_blocks < 1:
        parser.error("--rounds, --storm-clients and --storm-blocks must be at least 1, 2 and 1")
    if args.storm_users < 2 * args.storm_blocks or args.race_users < 2:
        parser.error("--storm-users must be at least 2 x --storm-blocks, --race-users at least 2")
    missing = missing_requirements()
    if missing:
        parser.error(f"the worker deployment needs {', '.join(missing)}")

    if args.nice:
        os.nice(args.nice)
    synapse_version = package_version("matrix-synapse")
    label = args.synapse_label or f"Synapse {synapse_version}"
    module = importlib.import_module("synapse_xsign_uia")
    print(f"{label} (matrix-synapse {synapse_version}), Python {platform.python_version()}")
    module_dir = Path(module.__file__ or "").parent
    commit = source_commit(module_dir)
    print(f"module: synapse_xsign_uia {module.__version__} from {module_dir}, commit {commit}")
    print(
        f"phases {','.join(args.phases)}; {os.cpu_count()} CPUs, niceness {os.nice(0)}, "
        f"pg_stat_statements {'on' if 'dbwork' in args.phases else 'off'}"
    )

    sides = {name: make_side(name, args) for name in SIDES}
    report: dict[str, Any] = {
        "synapse_version": synapse_version,
        "label": label,
        "date": datetime.date.today().isoformat(),
        "module_version": module.__version__,
        "module_commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "niceness": os.nice(0),
        "phases": args.phases,
    }
    started = time.monotonic()
    with Run(sides, args.keep):
        run_parallel([functools.partial(find_serving, side) for side in sides.values()])
        print(f"deployments started in {time.monotonic() - started:.0f}s")
        waited: dict[str, float] = {}

        def wait(side: Side) -> None:
            waited[side.name] = wait_for_background_updates(side)

        run_parallel([functools.partial(wait, side) for side in sides.values()])
        print(
            "Synapse's background updates of the new databases done after "
            + ", ".join(f"{waited[name]:.0f}s ({name})" for name in SIDES)
        )
        report["deployments"] = describe(sides)
        if "latency" in args.phases:
            report["latency"] = run_latency(sides, args)
        if "storm" in args.phases:
            report["storm"] = run_storm(sides, args)
        if "race" in args.phases:
            report["race"] = run_race(sides, args)
        if "dbwork" in args.phases:
            report["dbwork"] = run_dbwork(sides, args)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
