"""What the upload benchmarks share: the Synapse settings both sides get, requests prepared
outside the timed region, and the figures that compare native Synapse with the module."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import requests

# Both sides get this, so that Synapse 1.98 answers a first upload without UIA as later
# versions do (MSC3967; later versions ignore the key), and never skips UIA for a recent
# login (its grace period would let native Synapse 1.98 replace keys without a challenge).
SHARED_EXTRA_CONFIG: dict[str, Any] = {
    "experimental_features": {"msc3967_enabled": True},
    "ui_auth": {"session_timeout": 0},
}


# The logging set-up that Synapse generates for a new install (`DEFAULT_LOG_CONFIG` in
# synapse/config/logger.py): INFO and below go through a memory buffer to the file.
STOCK_LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.handlers.TimedRotatingFileHandler
    formatter: precise
    filename: {log_file}
    when: midnight
    backupCount: 3
    encoding: utf8
  buffer:
    class: synapse.logging.handlers.PeriodicallyFlushingMemoryHandler
    target: file
    capacity: 10
    flushLevel: 30
    period: 5
loggers:
  synapse.storage.SQL:
    level: INFO
root:
  level: INFO
  handlers: [buffer]
disable_existing_loggers: false
"""


@attrs.frozen
class Prepared:
    """One request, serialised in advance: the timed region only sends it."""

    token: str
    body: bytes


@attrs.frozen
class Replacement:
    """A user with keys, and the new keys it replaces them with through UIA."""

    token: str
    user_id: str
    password: str
    body: dict[str, Any]


def timed_post(
    session: requests.Session, url: str, token: str, body: bytes, timeout: float = 60
) -> tuple[float, requests.Response]:
    """POST a prepared body; the time of the whole exchange, the body read included."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    start = time.perf_counter()
    response = session.post(url, data=body, headers=headers, timeout=timeout)
    _ = response.content
    return time.perf_counter() - start, response


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def password_auth(replacement: Replacement, session: str) -> dict[str, Any]:
    return {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": replacement.user_id},
        "password": replacement.password,
        "session": session,
    }


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (the `inclusive` method)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio_interval(
    module: Sequence[float], native: Sequence[float], resamples: int = 1000
) -> tuple[float, float]:
    """A 95% bootstrap interval for the ratio of medians."""
    rng = random.Random(0)
    ratios = []
    for _ in range(resamples):
        m = statistics.median(rng.choices(module, k=len(module)))
        n = statistics.median(rng.choices(native, k=len(native)))
        ratios.append(m / n)
    return quantile(ratios, 0.025), quantile(ratios, 0.975)


def paired_ratio(
    module: Sequence[float], native: Sequence[float], resamples: int = 1000
) -> tuple[float, float, float]:
    """The median over rounds of module/native for the requests of one round, which ran
    back to back, with a 95% bootstrap interval. Load that comes and goes during a run
    falls on both requests of a pair, so this moves less between runs on a busy machine."""
    ratios = [m / n for m, n in zip(module, native, strict=True)]
    rng = random.Random(0)
    medians = [statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples)]
    return statistics.median(ratios), quantile(medians, 0.025), quantile(medians, 0.975)


def compare(
    native: Sequence[float],
    module: Sequence[float],
    native_statuses: Counter[int],
    module_statuses: Counter[int],
) -> dict[str, Any]:
    """The figures of one row: each side's median and p90 (in ms, from samples in seconds)
    and the ratios module / native."""
    entry: dict[str, Any] = {}
    for name, samples, statuses in (
        ("native", native, native_statuses),
        ("module", module, module_statuses),
    ):
        entry[name] = {
            "median_ms": statistics.median(samples) * 1000,
            "p90_ms": quantile(samples, 0.9) * 1000,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
        }
    entry["ratio_median"] = entry["module"]["median_ms"] / entry["native"]["median_ms"]
    entry["ratio_p90"] = entry["module"]["p90_ms"] / entry["native"]["p90_ms"]
    entry["ratio_median_95ci"] = list(ratio_interval(module, native))
    paired, low, high = paired_ratio(module, native)
    entry["paired_ratio"] = paired
    entry["paired_ratio_95ci"] = [low, high]
    return entry


def _statuses(counts: Mapping[str, int]) -> str:
    return "/".join(counts)


def print_comparison(rows: Mapping[str, dict[str, Any]], label: str = "path") -> None:
    """A table of `compare` rows, one line each, under the given label."""
    width = max(20, *(len(name) for name in rows))
    header = (
        f"{label:<{width}} {'native med':>10} {'native p90':>10} {'module med':>10} "
        f"{'module p90':>10} {'ratio med':>9} {'95% CI':>13} {'ratio p90':>9} "
        f"{'paired':>7} {'95% CI':>13}  status n/m"
    )
    print(header)
    print("-" * len(header))
    for name, f in rows.items():
        low, high = f["ratio_median_95ci"]
        paired_low, paired_high = f["paired_ratio_95ci"]
        print(
            f"{name:<{width}} {f['native']['median_ms']:>10.2f} {f['native']['p90_ms']:>10.2f} "
            f"{f['module']['median_ms']:>10.2f} {f['module']['p90_ms']:>10.2f} "
            f"{f['ratio_median']:>9.3f} {f'{low:.3f}-{high:.3f}':>13} {f['ratio_p90']:>9.3f} "
            f"{f['paired_ratio']:>7.3f} {f'{paired_low:.3f}-{paired_high:.3f}':>13}  "
            f"{_statuses(f['native']['statuses'])}/{_statuses(f['module']['statuses'])}"
        )
    print(
        "(latencies in ms; ratio = module / native: of the medians, of the p90s, and the "
        "median of the ratios of the two requests of each round)"
    )


def add_common_options(parser: argparse.ArgumentParser, started: str) -> None:
    """The options every upload benchmark takes; `started` names what it starts ("the
    servers", "the deployments")."""
    parser.add_argument(
        "--synapse-label", default=None, help="label for the Synapse build (default: its version)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--unbuffered-log",
        action="store_true",
        help="log through the test harness's unbuffered file handler instead of the buffered "
        "set-up Synapse generates for a new install",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help=f"add this to the scheduling niceness of this process and {started} it starts "
        "(negative needs root): on a shared machine, -10 keeps other load out of the figures",
    )
    parser.add_argument(
        "--keep", action="store_true", help=f"keep the directories of {started} (logs, databases)"
    )
