"""Amplification of the device-list resync endpoint: federation requests per client request
when clients flood `GET /_matrix/unstable/org.matrix.mscXXXX/user/{userId}/devices` for one
remote user.

Starts two homeservers that federate over TLS on loopback (the local one with the module),
puts one remote user and many local users in a room, then floods the endpoint for that remote
user from several threads for a fixed time, and counts what the remote server actually
answered: its access log lists every `GET /_matrix/federation/v1/user/devices/...`.

Phases:
  users        the local users in the room, round-robin (each has its own rate limit)
  admin        one server admin (exempt from the rate limit: only the single flight and the
               cooldown stand between the flood and the remote server)
  slow_remote  the admin flood while the remote server is frozen for the first seconds, so
               that every request waits on the one fetch in flight
  workers      the admin flood spread round-robin over the main process and `--workers`
               generic workers of a second homeserver (PostgreSQL + Redis), whose remote is
               a static TLS server answering a fixed device list after `--remote-delay`
               seconds; it counts the GETs that server received

Without the module's protections each client request would be one federation request
(amplification 1.0). With them the remote sees about one request per cooldown period, for
the whole homeserver however many processes serve the endpoint.

Run with the python of the environment that has the Synapse to measure, from the repository
root:

    python benchmarks/resync_amplification.py [--duration S] [--threads N] [--users N]
                                              [--cooldown 5s] [--workers N]
                                              [--phases users,admin,slow_remote,workers]
                                              [--json FILE]

The `workers` phase needs PostgreSQL, Redis and `matrix-synapse[postgres,redis]`; without
them it is left out, with a note.

It prints figures and asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import requests

if __package__ in (None, ""):
    # Run as a script: make the repository root importable for the test harness.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.client import User, register_user
from tests.harness.federation import (
    FederatingSynapse,
    StaticFederationServer,
    device_list,
    join_room,
    share_room,
    start_all,
)
from tests.harness.workers import WorkerDeployment, missing_requirements

ROUTE = "/_matrix/unstable/org.matrix.mscXXXX/user/{}/devices"
SINGLE_PROCESS_PHASES = ("users", "admin", "slow_remote")
PHASES = (*SINGLE_PROCESS_PHASES, "workers")


@attrs.define
class Phase:
    name: str
    duration_s: float
    statuses: Counter[int] = attrs.field(factory=Counter)
    latencies_ms: list[float] = attrs.field(factory=list)
    federation_requests: int = 0
    elapsed_s: float = 0.0

    @property
    def client_requests(self) -> int:
        return sum(self.statuses.values())

    def figures(self, cooldown_s: float) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        requests_total = self.client_requests
        return {
            "phase": self.name,
            "client_requests": requests_total,
            "client_requests_per_s": requests_total / self.elapsed_s if self.elapsed_s else 0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "federation_requests": self.federation_requests,
            "amplification": self.federation_requests / requests_total if requests_total else 0,
            "cooldown_periods": math.ceil(self.elapsed_s / cooldown_s),
            "latency_ms_p50": statistics.median(lat) if lat else 0,
            "latency_ms_p95": lat[min(len(lat) - 1, int(len(lat) * 0.95))] if lat else 0,
            "latency_ms_max": lat[-1] if lat else 0,
        }


def flood(
    phase: Phase,
    requesters: Sequence[User],
    target: str,
    threads: int,
    federation_requests: Callable[[], int],
    during: Callable[[], None] | None = None,
) -> None:
    """Send requests for `target` from `threads` threads until the phase's time is up,
    taking `requesters` in turn; `federation_requests()` says how many device-list requests
    the remote server has had so far."""
    before = federation_requests()
    path = ROUTE.format(urllib.parse.quote(target, safe=""))
    lock = threading.Lock()
    counter = iter(range(10**9))
    deadline = time.monotonic() + phase.duration_s

    def worker() -> None:
        sessions = {id(user): requests.Session() for user in requesters}
        while time.monotonic() < deadline:
            with lock:
                user = requesters[next(counter) % len(requesters)]
            started = time.perf_counter()
            response = sessions[id(user)].get(
                user.base_url + path,
                headers={"Authorization": f"Bearer {user.access_token}"},
                timeout=60,
            )
            took = (time.perf_counter() - started) * 1000
            with lock:
                phase.statuses[response.status_code] += 1
                phase.latencies_ms.append(took)

    started = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    if during is not None:
        during()
    for thread in pool:
        thread.join()
    phase.elapsed_s = time.monotonic() - started
    # A request is logged as it finishes; let the last one land.
    time.sleep(1.0)
    phase.federation_requests = federation_requests() - before


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    header = (
        f"{'phase':<12} {'client req':>10} {'req/s':>7} {'fed req':>8} {'amplification':>14} "
        f"{'cooldowns':>9} {'p50 ms':>8} {'p95 ms':>8}  statuses"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in row["statuses"].items())
        print(
            f"{row['phase']:<12} {row['client_requests']:>10} "
            f"{row['client_requests_per_s']:>7.1f} {row['federation_requests']:>8} "
            f"{row['amplification']:>14.5f} {row['cooldown_periods']:>9} "
            f"{row['latency_ms_p50']:>8.1f} {row['latency_ms_p95']:>8.1f}  {statuses}"
        )
    print("(amplification = federation requests / client requests; 1.0 without protection)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=20, help="seconds per phase (20)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent clients (8)")
    parser.add_argument("--users", type=int, default=10, help="local users in the room (10)")
    parser.add_argument("--cooldown", default="5s", help="per_user_cooldown (5s)")
    parser.add_argument("--rate-per-second", type=float, default=0.2, help="(0.2)")
    parser.add_argument("--burst-count", type=int, default=5, help="(5)")
    parser.add_argument("--freeze", type=float, default=3, help="slow_remote freeze, s (3)")
    parser.add_argument("--workers", type=int, default=2, help="generic workers (2)")
    parser.add_argument(
        "--remote-delay", type=float, default=0.5, help="workers: remote answers after, s (0.5)"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated, run in this order: {','.join(PHASES)} (all)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        parser.error(f"--phases: unknown {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if args.workers < 1:
        parser.error("--workers: at least 1")

    import synapse

    module_config = {
        "device_list_resync": {
            "timeout": "10s",
            "per_user_cooldown": args.cooldown,
            "rate_per_second": args.rate_per_second,
            "burst_count": args.burst_count,
        }
    }
    print(
        f"matrix-synapse {synapse.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; {args.threads} threads, {args.duration:g}s per phase, "
        f"device_list_resync: {module_config['device_list_resync']}"
    )
    if "workers" in phases:
        print(
            f"workers phase: main + {args.workers} generic workers, "
            f"the remote answers after {args.remote_delay:g}s"
        )
    cooldown_s = _duration_s(args.cooldown)
    rows: list[dict[str, Any]] = []
    single = [name for name in SINGLE_PROCESS_PHASES if name in phases]
    if single:
        rows += single_process_phases(args, module_config, single, cooldown_s)
    if "workers" in phases:
        missing = missing_requirements()
        if missing:
            print(f"workers phase left out: missing {', '.join(missing)}")
        else:
            rows.append(workers_phase(args, module_config, cooldown_s))

    print()
    print_table(rows)
    if args.json is not None:
        args.json.write_text(json.dumps({"synapse": synapse.__version__, "phases": rows}, indent=2))
        print(f"figures written to {args.json}")
    return 0


def single_process_phases(
    args: argparse.Namespace,
    module_config: dict[str, Any],
    phases: Sequence[str],
    cooldown_s: float,
) -> list[dict[str, Any]]:
    """The floods against one Synapse process that federates with a real remote Synapse."""
    local = FederatingSynapse(module_config, name="bench-local")
    remote = FederatingSynapse({}, name="bench-remote", send_federation=False)
    start_all(local, remote)
    rows = []
    try:
        remote_user = register_user(remote.base_url, remote.shared_secret)
        first = register_user(local.base_url, local.shared_secret)
        room_id = share_room(remote_user, remote, first)
        users = [first]
        if "users" in phases:
            for _ in range(args.users - 1):
                user = register_user(local.base_url, local.shared_secret)
                join_room(user, room_id, remote, remote_user.user_id)
                users.append(user)
        admin = register_user(local.base_url, local.shared_secret, admin=True)
        target = remote_user.user_id

        def queries() -> int:
            return remote.device_list_queries(target)

        def freeze() -> None:
            with remote.paused():
                time.sleep(args.freeze)

        for index, name in enumerate(phases):
            if index:
                # Start each phase outside the previous phase's cooldown.
                time.sleep(cooldown_s)
            phase = Phase(name, args.duration)
            if name == "users":
                flood(phase, users, target, args.threads, queries)
            elif name == "admin":
                flood(phase, [admin], target, args.threads, queries)
            else:
                flood(phase, [admin], target, args.threads, queries, during=freeze)
            rows.append(phase.figures(cooldown_s))
    finally:
        local.stop()
        remote.stop()
    return rows


def workers_phase(
    args: argparse.Namespace, module_config: dict[str, Any], cooldown_s: float
) -> dict[str, Any]:
    """The admin flood spread over a main process and `args.workers` generic workers."""
    extra = {
        # Outbound federation only, to a static TLS server with a self-signed certificate.
        "federation_verify_certificates": False,
        "ip_range_whitelist": ["127.0.0.0/8"],
    }
    deployment = WorkerDeployment(module_config, extra, workers=args.workers)
    with StaticFederationServer(200, delay=args.remote_delay) as remote:
        deployment.start()
        try:
            target = f"@flooded:{remote.server_name}"
            remote.body = device_list(target, "BENCHMARK")
            admin = register_user(deployment.main.base_url, deployment.shared_secret, admin=True)
            # The same access token on every process, taken in turn by the threads.
            requesters = [
                User(
                    process.base_url,
                    admin.user_id,
                    admin.access_token,
                    admin.device_id,
                    admin.password,
                )
                for process in deployment.processes
            ]
            phase = Phase("workers", args.duration)
            flood(phase, requesters, target, args.threads, lambda: remote.requests)
            return phase.figures(cooldown_s)
        finally:
            deployment.stop()


def _duration_s(text: str) -> float:
    from synapse_xsign_uia.config import parse_duration

    value: Any = int(text) if text.isdigit() else text
    return parse_duration(value, ["per_user_cooldown"]) / 1000


if __name__ == "__main__":
    sys.exit(main())
