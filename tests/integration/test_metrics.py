"""The module's Prometheus metrics, scraped from a real Synapse's metrics listener after
known requests: every upload rule, the admin window's grant, revoke and use, and each
outcome of the device-list resync endpoint against fake remote homeservers."""

from __future__ import annotations

import importlib
import socket
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from typing import Any

import attrs
import prometheus_client
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from synapse_xsign_uia import metrics
from synapse_xsign_uia.outcomes import AdminAction, UploadOutcome, UploadResult
from tests.harness.client import CrossSigningKeys, SigningKeyPair, User, register_user
from tests.harness.federation import StaticFederationServer
from tests.harness.server import SynapseServer, free_port

METRICS_PATH = "/_synapse/metrics"
RESYNC_ROUTE = "/_matrix/unstable/org.matrix.mscXXXX/user/{}/devices"
WINDOW_ROUTE = "/_synapse/admin/v1/users/{}/_allow_cross_signing_replacement_without_uia"
RESYNC_TIMEOUT_S = 2
DENIED_SERVER = "denied.example.org"

Labels = frozenset[tuple[str, str]]


# --- Without a homeserver ---------------------------------------------------------------


def test_synapse_serves_the_default_registry() -> None:
    synapse_metrics = importlib.import_module("synapse.metrics")
    assert synapse_metrics.REGISTRY is prometheus_client.REGISTRY


@pytest.mark.parametrize(
    ("outcome", "label"),
    [
        ("uploaded", "uploaded"),
        ("nothing_written", "nothing_written"),
        ("uia_challenge", "uia_challenge"),
        ("refused:M_BAD_JSON", "refused:M_BAD_JSON"),
        ("refused:M_LIMIT_EXCEEDED", "refused:M_LIMIT_EXCEEDED"),
        ("refused:M_SOMETHING_NEW", "refused:other"),
        ("refused:" + "x" * 500, "refused:other"),
        ("delegated:200", "delegated:200"),
        ("delegated:401", "delegated:401"),
        ("delegated:2000", "delegated:other"),
        ("delegated:abc", "delegated:other"),
        ("delegated:0200", "delegated:other"),
        ("delegated:\u0662\u0660\u0660", "delegated:other"),
        ("uploaded\n", "other"),
        ("Not An Outcome", "other"),
    ],
)
def test_upload_outcome_labels_are_bounded(outcome: str, label: str) -> None:
    assert metrics.upload_outcome_label(outcome) == label


def sample(name: str, **labels: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_one_set_of_counters_per_process() -> None:
    server_name = "instances.test"
    first = metrics.for_server(server_name)
    assert metrics.for_server(server_name) is first
    first.admin_window(AdminAction.GRANT)
    # A second copy of the module's code takes the registered counters over.
    reloaded = importlib.reload(metrics)
    reloaded.for_server(server_name).admin_window(AdminAction.GRANT)
    # A homeserver in the same process counts on its own series.
    reloaded.for_server("other.test").admin_window(AdminAction.GRANT)
    grants = sample(metrics.ADMIN_WINDOW, server_name=server_name, action="grant")
    assert grants == 2
    assert sample(metrics.ADMIN_WINDOW, server_name="other.test", action="grant") == 1


def test_unknown_label_values_are_folded() -> None:
    counters = metrics.for_server("fold.test")
    # The types say no caller can pass these; the labels stay bounded all the same.
    unknown: Any = "no_such_value"
    counters.upload_decision(unknown, UploadResult(UploadOutcome.UPLOADED))
    counters.resync_request(unknown)
    counters.admin_window(unknown)
    assert sample(
        metrics.UPLOAD_DECISIONS, server_name="fold.test", rule="other", outcome="uploaded"
    )
    assert sample(metrics.RESYNC_REQUESTS, server_name="fold.test", outcome="other") == 1
    assert sample(metrics.ADMIN_WINDOW, server_name="fold.test", action="other") == 1


# --- A homeserver with its metrics listener ---------------------------------------------


class HangingServer:
    """Accepts TCP connections (the kernel does, into the backlog) and never answers, so a
    federation request to it hangs."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self.server_name = f"localhost:{self._socket.getsockname()[1]}"

    def close(self) -> None:
        self._socket.close()


@attrs.define
class Deployment:
    server: SynapseServer
    metrics_url: str
    initial: dict[tuple[str, Labels], float]
    fetched: StaticFederationServer
    failing: StaticFederationServer
    hanging: HangingServer

    def user(self, *, admin: bool = False) -> User:
        return register_user(self.server.base_url, self.server.shared_secret, admin=admin)


def scrape(url: str) -> dict[tuple[str, Labels], float]:
    """Every sample of the module's metrics: (sample name, labels) -> value."""
    response = requests.get(url, timeout=30)
    response.raise_for_status()
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            if s.name.startswith("synapse_xsign_uia_"):
                samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    fetched = StaticFederationServer(200, {"stream_id": 1, "devices": []})
    failing = StaticFederationServer(404, {"errcode": "M_UNRECOGNIZED", "error": "no"})
    hanging = HangingServer()
    port, metrics_port = free_port(), free_port()
    while metrics_port == port:
        metrics_port = free_port()
    extra_config: dict[str, Any] = {
        "enable_metrics": True,
        # Replaces the base configuration's list: Synapse's dedicated metrics listener, and
        # the `metrics` resource on the HTTP listener, the other way Synapse offers.
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client", "metrics"], "compress": False}],
            },
            {"port": metrics_port, "bind_addresses": ["127.0.0.1"], "type": "metrics"},
        ],
        "federation_verify_certificates": False,
        "ip_range_whitelist": ["127.0.0.0/8"],
        "federation_domain_whitelist": [
            fetched.server_name,
            failing.server_name,
            hanging.server_name,
        ],
    }
    module_config = {
        "device_list_resync": {
            "timeout": f"{RESYNC_TIMEOUT_S}s",
            "per_user_cooldown": "10m",
            "rate_per_second": 0.001,
            "burst_count": 1,
        }
    }
    server = SynapseServer(module_config, extra_config=extra_config, name="metrics", port=port)
    try:
        with fetched, failing:
            try:
                server.start()
                url = f"http://127.0.0.1:{metrics_port}{METRICS_PATH}"
                yield Deployment(server, url, scrape(url), fetched, failing, hanging)
            finally:
                server.stop()
    finally:
        hanging.close()


def labels(name: str, server_name: str, **values: str) -> tuple[str, Labels]:
    return name, frozenset({"server_name": server_name, **values}.items())


class Scrape:
    """The module's counters before and after a test's requests."""

    def __init__(self, deployment: Deployment) -> None:
        self._deployment = deployment
        self._before = scrape(deployment.metrics_url)

    def deltas(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        """What changed in `name`, keyed by the values of `label_names`."""
        after = scrape(self._deployment.metrics_url)
        changed: dict[tuple[str, ...], float] = {}
        for key, value in after.items():
            sample_name, sample_labels = key
            if sample_name != name:
                continue
            values = dict(sample_labels)
            assert values.pop("server_name") == self._deployment.server.server_name
            assert set(values) == set(label_names)
            delta = value - self._before.get(key, 0.0)
            if delta:
                changed[tuple(values[label] for label in label_names)] = delta
        return changed


def test_known_series_exist_from_start_up(deployment: Deployment) -> None:
    server_name = deployment.server.server_name
    expected = [
        labels(metrics.UPLOAD_DECISIONS, server_name, rule=rule, outcome=outcome)
        for rule, outcomes in metrics.UPLOAD_OUTCOMES.items()
        for outcome in outcomes
    ]
    expected += [
        labels(metrics.ADMIN_WINDOW, server_name, action=action)
        for action in ("grant", "revoke", "used")
    ]
    expected += [
        labels(metrics.RESYNC_REQUESTS, server_name, outcome=outcome)
        for outcome in metrics.RESYNC_OUTCOMES
    ]
    expected.append(labels(metrics.RESYNC_FEDERATION_REQUESTS, server_name))
    expected += [
        labels(metrics.IDENTITY_RESETS, server_name, rule=rule) for rule in metrics.RESET_RULES
    ]
    assert {key: deployment.initial.get(key) for key in expected} == dict.fromkeys(expected, 0.0)
    # One label value per decision-table row, and one for refusals before a row is chosen.
    rules = {v for _, ls in deployment.initial for k, v in ls if k == "rule"}
    assert rules == {
        "validation",
        "no_keys",
        "identical_reupload",
        "first_upload",
        "appservice",
        "replacement_window",
        "delegated_auth",
        "uia",
    }


def test_both_metrics_endpoints_serve_the_counters(deployment: Deployment) -> None:
    on_listener = scrape(f"{deployment.server.base_url}{METRICS_PATH}")
    assert set(on_listener) == set(scrape(deployment.metrics_url))


def test_upload_decisions(deployment: Deployment) -> None:
    user = deployment.user()
    stranger = deployment.user()
    scraped = Scrape(deployment)

    assert user.upload({}).status_code == 200
    assert user.upload({"master_key": "not an object"}).status_code == 400
    bad = stranger.keys().body()
    bad["self_signing_key"] = stranger.keys().self_signing_key(signer=SigningKeyPair())
    assert stranger.upload(bad).status_code == 400
    keys = user.keys()
    assert user.upload(keys.body()).status_code == 200
    assert user.upload(keys.body()).status_code == 200
    # A challenge, then the upload with the password.
    assert user.upload_with_uia(user.keys().body()).status_code == 200
    challenge = user.upload(user.keys().body())
    assert challenge.status_code == 401
    wrong = {**user.password_auth(challenge.json()["session"]), "password": "wrong"}
    assert user.upload({**user.keys().body(), "auth": wrong}).status_code in (401, 403)

    assert scraped.deltas(metrics.UPLOAD_DECISIONS, "rule", "outcome") == {
        ("validation", "refused:M_BAD_JSON"): 1,
        ("first_upload", "refused:M_INVALID_SIGNATURE"): 1,
        ("no_keys", "nothing_written"): 1,
        ("first_upload", "uploaded"): 1,
        ("identical_reupload", "nothing_written"): 1,
        ("uia", "uia_challenge"): 3,
        ("uia", "uploaded"): 1,
    }
    # The first upload set an identity up; only the replacement after UIA reset it.
    assert scraped.deltas(metrics.IDENTITY_RESETS, "rule") == {("uia",): 1}


def window(admin: User, method: str, user: User) -> requests.Response:
    path = WINDOW_ROUTE.format(urllib.parse.quote(user.user_id, safe=""))
    return admin.request(method, path, {} if method == "POST" else None)


def test_admin_window(deployment: Deployment) -> None:
    admin = deployment.user(admin=True)
    user = deployment.user()
    keys = user.keys()
    assert user.upload(keys.body()).status_code == 200
    scraped = Scrape(deployment)

    assert window(admin, "POST", user).status_code == 200
    # A new self-signing key alone goes through the window without using it up.
    new_subkey = CrossSigningKeys(user.user_id, master=keys.master)
    assert user.upload(new_subkey.body(master=False, usk=False)).status_code == 200
    assert user.upload(user.keys().body()).status_code == 200
    assert window(admin, "POST", user).status_code == 200
    assert window(admin, "DELETE", user).status_code == 200
    # Status requests and refused requests count nothing.
    assert window(admin, "GET", user).status_code == 200
    assert window(user, "POST", user).status_code == 403

    assert scraped.deltas(metrics.ADMIN_WINDOW, "action") == {
        ("grant",): 2,
        ("used",): 1,
        ("revoke",): 1,
    }
    assert scraped.deltas(metrics.UPLOAD_DECISIONS, "rule", "outcome") == {
        ("replacement_window", "uploaded"): 2
    }
    # The new self-signing key alone reset nothing.
    assert scraped.deltas(metrics.IDENTITY_RESETS, "rule") == {("replacement_window",): 1}


def resync(user: User | None, target: str, deployment: Deployment) -> requests.Response:
    path = RESYNC_ROUTE.format(urllib.parse.quote(target, safe=""))
    if user is None:
        return requests.get(f"{deployment.server.base_url}{path}", timeout=30)
    return user.request("GET", path)


def test_resync_requests(deployment: Deployment) -> None:
    admin = deployment.user(admin=True)
    user = deployment.user()
    fetched = f"@alice:{deployment.fetched.server_name}"
    failing = f"@bob:{deployment.failing.server_name}"
    hanging = f"@carol:{deployment.hanging.server_name}"
    scraped = Scrape(deployment)

    statuses = [
        resync(admin, fetched, deployment).status_code,
        resync(admin, fetched, deployment).status_code,
        resync(admin, failing, deployment).status_code,
        resync(admin, hanging, deployment).status_code,
        resync(admin, f"@dave:{DENIED_SERVER}", deployment).status_code,
        resync(user, fetched, deployment).status_code,
        resync(user, fetched, deployment).status_code,
        resync(admin, user.user_id, deployment).status_code,
        resync(admin, "not-a-user-id", deployment).status_code,
        admin.request("GET", RESYNC_ROUTE.format("x") + "/extra").status_code,
        resync(None, fetched, deployment).status_code,
    ]

    assert statuses == [202, 202, 502, 502, 403, 403, 429, 400, 400, 404, 401]
    assert scraped.deltas(metrics.RESYNC_REQUESTS, "outcome") == {
        ("fetched",): 1,
        ("cooldown",): 1,
        ("failed",): 1,
        ("timed_out",): 1,
        ("federation_denied",): 1,
        ("no_shared_room",): 1,
        ("rate_limited",): 1,
        ("invalid",): 3,
        ("unauthorized",): 1,
    }
    # One per fetch: the cooldown and every refusal sent nothing.
    assert scraped.deltas(metrics.RESYNC_FEDERATION_REQUESTS) == {(): 3}
    assert (deployment.fetched.requests, deployment.failing.requests) == (1, 1)


def test_counts_match_the_log(deployment: Deployment) -> None:
    """Each upload decision line in the log is counted once, with the same rule and
    outcome."""
    user = deployment.user()
    assert user.upload(user.keys().body()).status_code == 200
    server_name = deployment.server.server_name
    logged = Counter(
        tuple(line.split(" rule=")[1].split(" outcome=")) for line in _decision_lines(deployment)
    )
    counted = {
        (dict(ls)["rule"], dict(ls)["outcome"]): value
        for (name, ls), value in scrape(deployment.metrics_url).items()
        if name == metrics.UPLOAD_DECISIONS and dict(ls)["server_name"] == server_name and value
    }
    assert counted == dict(logged)


def _decision_lines(deployment: Deployment) -> list[str]:
    return deployment.server.log_lines("cross-signing upload decision:")
