"""Latency of the cross-signing key upload, native Synapse against Synapse with the module.

The endpoint is `POST /_matrix/client/v3/keys/device_signing/upload`.

Starts two homeservers with the same configuration, one of them with the module, prepares
users and keys for both outside the timed region, then times the same requests against both,
alternating which server goes first each round so that drift (caches, the SQLite files
growing, other load on the machine) falls on both alike. Each request is timed with
`time.perf_counter` on a persistent HTTP connection (one `requests.Session` per server).

Paths:
  identical_reupload  a user with keys re-sends exactly the keys stored
  first_upload        a registered user without keys uploads master + self-signing +
                      user-signing keys (a fresh user every round)
  uia_challenge       a user with keys sends other keys without `auth`: 401 and a UIA session
  replacement         a user with keys replaces all three: the 401 challenge, then the same
                      keys with the password in that session (both requests timed together;
                      a fresh user every round)

Run with the python of the environment that has the Synapse to measure, from the repository
root:

    python benchmarks/upload_latency.py [--rounds N] [--synapse-label TEXT] [--json FILE]

It prints figures and asserts nothing about them.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import attrs
import requests

if __package__ in (None, ""):
    # Run as a script: make the repository root importable for the test harness.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    timed_post,
)
from tests.harness.client import UPLOAD_PATH, CrossSigningKeys, register_user
from tests.harness.parallel import run_parallel
from tests.harness.server import SynapseServer

PATHS = ("identical_reupload", "first_upload", "uia_challenge", "replacement")
SERVERS = ("native", "module")


def make_server(name: str, with_module: bool, unbuffered_log: bool) -> SynapseServer:
    server = SynapseServer({}, with_module=with_module, name=name)
    extra = dict(SHARED_EXTRA_CONFIG)
    if not unbuffered_log:
        log_config = server.directory / "stock-log.yaml"
        log_config.write_text(STOCK_LOG_CONFIG.format(log_file=server.log_path))
        extra["log_config"] = str(log_config)
    server.extra_config = extra
    return server


@attrs.define
class Target:
    """One homeserver and everything prepared for it."""

    name: str
    server: SynapseServer
    session: requests.Session = attrs.field(factory=requests.Session)
    identical: Prepared | None = None
    challenge: Prepared | None = None
    fresh: list[Prepared] = attrs.field(factory=list)
    replacements: list[Replacement] = attrs.field(factory=list)
    samples: dict[str, list[float]] = attrs.field(factory=lambda: {p: [] for p in PATHS})
    statuses: dict[str, Counter[int]] = attrs.field(factory=lambda: {p: Counter() for p in PATHS})

    @property
    def url(self) -> str:
        return f"{self.server.base_url}{UPLOAD_PATH}"

    def _post(self, token: str, body: bytes) -> tuple[float, requests.Response]:
        return timed_post(self.session, self.url, token, body)

    def send(self, prepared: Prepared) -> tuple[float, int]:
        elapsed, response = self._post(prepared.token, prepared.body)
        return elapsed, response.status_code

    def next_fresh(self) -> Prepared:
        return self.fresh.pop()

    def replace(self, replacement: Replacement) -> tuple[float, int]:
        """The challenge, then the password in its session: the two requests' time."""
        first, response = self._post(replacement.token, encode(replacement.body))
        if response.status_code != 401:
            return first, response.status_code
        auth = password_auth(replacement, response.json()["session"])
        second, response = self._post(replacement.token, encode({**replacement.body, "auth": auth}))
        return first + second, response.status_code


def _user_with_keys(server: SynapseServer) -> tuple[str, str, dict[str, Any]]:
    """A user whose cross-signing keys are stored: its ID, token and the body it uploaded."""
    user = register_user(server.base_url, server.shared_secret)
    body = user.keys().body()
    user.upload_with_uia(body).raise_for_status()
    return user.user_id, user.access_token, body


def prepare(target: Target, fresh_users: int) -> None:
    """Register users and build bodies for every path. Not timed."""
    server = target.server
    _, token, body = _user_with_keys(server)
    target.identical = Prepared(token, encode(body))

    # The challenge user has keys stored and sends another valid set for itself.
    user_id, token, _ = _user_with_keys(server)
    target.challenge = Prepared(token, encode(CrossSigningKeys(user_id).body()))

    for _ in range(fresh_users):
        user = register_user(server.base_url, server.shared_secret)
        target.fresh.append(Prepared(user.access_token, encode(user.keys().body())))
        user = register_user(server.base_url, server.shared_secret)
        user.upload_with_uia(user.keys().body()).raise_for_status()
        target.replacements.append(
            Replacement(user.access_token, user.user_id, user.password, user.keys().body())
        )
    # Warm the connection so that no timed request opens one.
    target.session.get(f"{server.base_url}/health", timeout=30).raise_for_status()


def one_round(targets: dict[str, Target], order: Sequence[str], record: bool, pause: float) -> None:
    """Each path once on each server, in `order`."""
    for path in PATHS:
        for name in order:
            target = targets[name]
            if path == "identical_reupload":
                assert target.identical is not None
                prepared = target.identical
            elif path == "uia_challenge":
                assert target.challenge is not None
                prepared = target.challenge
            elif path == "replacement":
                prepared = None
            else:
                prepared = target.next_fresh()
            if prepared is None:
                elapsed, status = target.replace(target.replacements.pop())
            else:
                elapsed, status = target.send(prepared)
            if record:
                target.samples[path].append(elapsed)
                target.statuses[path][status] += 1
            if pause:
                time.sleep(pause)


def summarise(targets: dict[str, Target]) -> dict[str, Any]:
    return {
        path: compare(
            targets["native"].samples[path],
            targets["module"].samples[path],
            targets["native"].statuses[path],
            targets["module"].statuses[path],
        )
        for path in PATHS
    }


def print_table(figures: dict[str, Any]) -> None:
    print_comparison({path: figures[path] for path in PATHS})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=400, help="timed rounds (default 400)")
    parser.add_argument("--warmup", type=int, default=40, help="untimed rounds first (default 40)")
    parser.add_argument(
        "--pause",
        type=float,
        default=2.0,
        help="milliseconds to wait after each request, so that one server's background work "
        "does not land in the other's timed request (default 2)",
    )
    add_common_options(parser, "the servers")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")

    if args.nice:
        os.nice(args.nice)
    synapse_version = package_version("matrix-synapse")
    label = args.synapse_label or f"Synapse {synapse_version}"
    module = importlib.import_module("synapse_xsign_uia")
    print(f"{label} (matrix-synapse {synapse_version}), Python {platform.python_version()}")
    print(
        f"module: synapse_xsign_uia {module.__version__} from {Path(module.__file__ or '').parent}"
    )
    print(
        f"{args.rounds} rounds after {args.warmup} warm-up rounds, {os.cpu_count()} CPUs, "
        f"niceness {os.nice(0)}"
    )
    load_before = os.getloadavg()

    servers = {
        name: make_server(name, with_module=name == "module", unbuffered_log=args.unbuffered_log)
        for name in SERVERS
    }
    started = time.monotonic()
    try:
        run_parallel([server.start for server in servers.values()])
        targets = {name: Target(name, server) for name, server in servers.items()}
        fresh_users = args.rounds + args.warmup
        run_parallel([functools.partial(prepare, t, fresh_users) for t in targets.values()])
        print(
            f"servers started and {fresh_users} users each prepared in "
            f"{time.monotonic() - started:.0f}s"
        )

        pause = args.pause / 1000
        timed = time.monotonic()
        for i in range(args.warmup + args.rounds):
            order = SERVERS if i % 2 == 0 else SERVERS[::-1]
            one_round(targets, order, record=i >= args.warmup, pause=pause)
        load_after = os.getloadavg()
        print(
            f"timed region: {time.monotonic() - timed:.0f}s; load average (1 min) "
            f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
        )
    finally:
        for server in servers.values():
            server.stop(cleanup=not args.keep)
        if args.keep:
            for name, server in servers.items():
                print(f"{name} server directory: {server.directory}")

    figures = summarise(targets)
    print()
    print_table(figures)
    if args.json is not None:
        report = {
            "synapse_version": synapse_version,
            "label": label,
            "date": datetime.date.today().isoformat(),
            "rounds": args.rounds,
            "warmup": args.warmup,
            "pause_ms": args.pause,
            "cpus": os.cpu_count(),
            "niceness": os.nice(0),
            "load_average_1min": [load_before[0], load_after[0]],
            "module_version": module.__version__,
            "python": platform.python_version(),
            "paths": figures,
            "samples_ms": {
                name: {path: [x * 1000 for x in target.samples[path]] for path in PATHS}
                for name, target in targets.items()
            },
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
