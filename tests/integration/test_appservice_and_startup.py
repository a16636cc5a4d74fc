"""Row 4 (application-service users) and what happens at start-up with bad configuration."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import yaml

from tests.harness.client import User
from tests.harness.server import SynapseServer

pytestmark = pytest.mark.synapse


class AppService:
    def __init__(self, server: SynapseServer) -> None:
        self.server = server
        self.as_token = secrets.token_hex(16)
        registration = {
            "id": "xsign-test-bridge",
            "url": None,
            "as_token": self.as_token,
            "hs_token": secrets.token_hex(16),
            "sender_localpart": "bridgebot",
            "namespaces": {"users": [{"exclusive": True, "regex": "@bridged_.*"}]},
            "rate_limited": False,
        }
        path = server.directory / "appservice.yaml"
        server.directory.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(registration))
        server.extra_config["app_service_config_files"] = [str(path)]

    def register(self) -> User:
        localpart = f"bridged_{secrets.token_hex(4)}"
        response = requests.post(
            f"{self.server.base_url}/_matrix/client/v3/register",
            json={"type": "m.login.application_service", "username": localpart},
            headers={"Authorization": f"Bearer {self.as_token}"},
            timeout=30,
        )
        response.raise_for_status()
        user_id = response.json()["user_id"]
        # Requests made with the AS token on the user's behalf carry the appservice.
        user = User(self.server.base_url, user_id, self.as_token, "", "")
        user.session.params = {"user_id": user_id}  # type: ignore[assignment]
        return user


def start_with_appservice(module_config: dict[str, Any]) -> Iterator[AppService]:
    server = SynapseServer(module_config, name="appservice")
    appservice = AppService(server)
    server.start()
    yield appservice
    server.stop()


@pytest.fixture(scope="module")
def appservice() -> Iterator[AppService]:
    yield from start_with_appservice({})


@pytest.fixture(scope="module")
def strict_appservice() -> Iterator[AppService]:
    yield from start_with_appservice({"appservice_without_uia": False})


def test_appservice_user_replaces_keys_without_uia(appservice: AppService) -> None:
    user = appservice.register()
    assert user.upload(user.keys().body()).status_code == 200
    new = user.keys()
    response = user.upload(new.body())
    assert (response.status_code, response.json()) == (200, {})
    assert user.stored_public_keys()["master"] == new.master.public
    assert appservice.server.log_lines(f"user={user.user_id} rule=appservice outcome=uploaded")


def test_appservice_toggle_off_refuses_replacement(strict_appservice: AppService) -> None:
    """An application service cannot complete UIA for a user (Synapse's handler needs the
    user's own access token), so with the exemption off a replacement is refused cleanly."""
    user = strict_appservice.register()
    old = user.keys()
    assert user.upload(old.body()).status_code == 200
    response = user.upload(user.keys().body())
    assert response.status_code == 403, response.text
    assert response.json()["errcode"] == "M_FORBIDDEN"
    assert "user-interactive authentication" in response.json()["error"]
    assert user.stored_public_keys()["master"] == old.master.public


@pytest.mark.parametrize(
    ("module_config", "named"),
    [
        ({"replacement_windw": "5m"}, "replacement_windw"),
        ({"first_upload_without_uia": "yes"}, "first_upload_without_uia"),
        ({"replacement_window": "2d"}, "max_replacement_window"),
        ({"device_list_resync": {"timeout": "-1s"}}, "device_list_resync.timeout"),
    ],
)
def test_bad_config_stops_synapse_naming_the_key(module_config: dict[str, Any], named: str) -> None:
    server = SynapseServer(module_config, name="badconfig")
    try:
        with pytest.raises(RuntimeError, match="exited") as info:
            server.start(timeout=120)
        assert named in str(info.value)
    finally:
        server.stop()
