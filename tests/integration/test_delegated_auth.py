"""Row 6 of the decision table: authentication delegated to the Matrix Authentication
Service (MAS). Synapse cannot run UIA then; the module keeps rows 1 to 5 and, where UIA
would be needed, gives Synapse's own delegated-auth answer: on current releases a `401`
that sends the user to MAS to approve the reset, on 1.98 (experimental MSC3861) a `501`.
Once MAS approves (it opens the replacement window), the replacement goes through, once.

A real Synapse with delegated auth, its tokens introspected by a stand-in for MAS
(tests/harness/fake_mas.py); real signed keys.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.harness import openapi
from tests.harness.client import User
from tests.harness.fake_mas import CLIENT_ID, FakeMas
from tests.harness.server import SynapseServer

pytestmark = pytest.mark.synapse

# Recent releases configure MAS under its own key; older ones (1.98) have MSC3861.
NATIVE_MAS = importlib.util.find_spec("synapse.config.mas") is not None
RESET_ACTION = "org.matrix.cross_signing_reset"


def delegated_auth_config(mas: FakeMas) -> dict[str, Any]:
    no_password = {"password_config": {"enabled": False}, "enable_registration": False}
    if NATIVE_MAS:
        return {
            **no_password,
            "matrix_authentication_service": {
                "enabled": True,
                "endpoint": mas.issuer,
                "secret": mas.secret,
            },
        }
    return {
        **no_password,
        "experimental_features": {
            "msc3861": {
                "enabled": True,
                "issuer": mas.issuer,
                "issuer_metadata": mas.metadata(),
                "client_id": CLIENT_ID,
                "client_auth_method": "client_secret_post",
                "client_secret": mas.client_secret,
                "admin_token": mas.secret,
                "account_management_url": mas.account_management_uri,
            }
        },
    }


@pytest.fixture(scope="module")
def mas() -> Iterator[FakeMas]:
    # On 1.98, Synapse's MSC3861 support needs authlib (the `oidc` extra, see tox.ini).
    with FakeMas() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(mas: FakeMas) -> Iterator[SynapseServer]:
    with SynapseServer(extra_config=delegated_auth_config(mas), name="mas") as synapse:
        yield synapse


def service_request(
    server: SynapseServer, mas: FakeMas, method: str, path: str, body: Any = None
) -> requests.Response:
    """A request as MAS makes them: with the shared secret as the access token."""
    return requests.request(
        method,
        f"{server.base_url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {mas.secret}"},
        timeout=30,
    )


_users = 0


def new_user(server: SynapseServer, mas: FakeMas, *, admin: bool = False) -> User:
    """A user as MAS provisions one, signed in on one device; an admin's token carries
    Synapse's admin scope."""
    global _users
    _users += 1
    localpart, device_id = f"mas{_users}", f"DEVICE{_users}"
    user_id = f"@{localpart}:{server.server_name}"
    if NATIVE_MAS:
        for path, body in (
            ("/_synapse/mas/provision_user", {"localpart": localpart}),
            ("/_synapse/mas/upsert_device", {"localpart": localpart, "device_id": device_id}),
        ):
            response = service_request(server, mas, "POST", path, body)
            assert response.status_code in (200, 201), response.text
    else:
        # MSC3861 creates the user and the device on the first introspection; the admin
        # API (with the admin token) creates the user first, as MAS does.
        response = service_request(
            server, mas, "PUT", f"/_synapse/admin/v2/users/{user_id}", {"displayname": localpart}
        )
        assert response.status_code in (200, 201), response.text
    user = User(
        base_url=server.base_url,
        user_id=user_id,
        access_token=mas.issue_token(localpart, device_id, admin=admin),
        device_id=device_id,
        password="",
    )
    whoami = user.request("GET", "/_matrix/client/v3/account/whoami")
    assert whoami.status_code == 200, whoami.text
    assert whoami.json()["user_id"] == user_id
    return user


def approve_reset(server: SynapseServer, mas: FakeMas, user: User) -> None:
    """What MAS does once the user approved the reset on their account page."""
    if NATIVE_MAS:
        response = service_request(
            server,
            mas,
            "POST",
            "/_synapse/mas/allow_cross_signing_reset",
            {"localpart": user.user_id[1:].split(":")[0]},
        )
    else:
        response = service_request(
            server,
            mas,
            "POST",
            f"/_synapse/admin/v1/users/{user.user_id}/_allow_cross_signing_replacement_without_uia",
            {},
        )
    assert response.status_code == 200, response.text


def decisions(server: SynapseServer, user: User) -> list[str]:
    needle = f"cross-signing upload decision: user={user.user_id} "
    return [line.split(needle)[1] for line in server.log_lines(needle)]


def assert_delegated_refusal(response: requests.Response, mas: FakeMas) -> None:
    """Synapse's own answer to an identity reset that MAS has not approved."""
    body = response.json()
    if NATIVE_MAS:
        assert response.status_code == 401, response.text
        stages = [stage for flow in body["flows"] for stage in flow["stages"]]
        assert "m.oauth" in stages, body
        assert "m.login.password" not in stages, body
        url = body["params"]["m.oauth"]["url"]
        assert url == f"{mas.account_management_uri}?action={RESET_ACTION}", body
    else:
        assert response.status_code == 501, response.text
        assert body["errcode"] == "M_UNRECOGNIZED", body
    assert not openapi.answer_errors(openapi.UPLOAD, "post", response.status_code, body)


def test_answers_only_delegated_auth_gives_are_documented_for_it() -> None:
    """docs/openapi.yaml marks the answers only delegated auth gives; the tests here
    produce each (the 501 on Synapse 1.98, the 401 on later releases)."""
    only_delegated = (
        openapi.documented_answers(deployment="delegated-auth") - openapi.documented_answers()
    )
    assert only_delegated == {(openapi.UPLOAD, "post", 501, "M_UNRECOGNIZED")}


def test_first_upload_and_identical_reupload_need_nothing(
    server: SynapseServer, mas: FakeMas
) -> None:
    user = new_user(server, mas)
    keys = user.keys()
    assert user.upload(keys.body()).status_code == 200
    assert user.upload(keys.body()).status_code == 200
    assert user.stored_public_keys()["master"] == keys.master.public
    assert decisions(server, user) == [
        "rule=first_upload outcome=uploaded",
        "rule=identical_reupload outcome=nothing_written",
    ]


def test_reset_gets_the_delegated_answer_and_writes_nothing(
    server: SynapseServer, mas: FakeMas
) -> None:
    user = new_user(server, mas)
    keys = user.keys()
    assert user.upload(keys.body()).status_code == 200
    other = user.keys()
    assert_delegated_refusal(user.upload(other.body()), mas)
    # A UIA `auth` cannot stand in for MAS's approval.
    with_auth = {**other.body(), "auth": {"type": "m.login.password", "session": "dummy"}}
    assert_delegated_refusal(user.upload(with_auth), mas)
    assert user.stored_public_keys()["master"] == keys.master.public
    # Synapse answers in its own servlet: a 401 it returns, or a 501 it raises.
    outcome = "delegated:401" if NATIVE_MAS else "refused:M_UNRECOGNIZED"
    assert decisions(server, user)[1:] == [f"rule=delegated_auth outcome={outcome}"] * 2


def test_reset_goes_through_once_mas_approved_it(server: SynapseServer, mas: FakeMas) -> None:
    user = new_user(server, mas)
    keys = user.keys()
    assert user.upload(keys.body()).status_code == 200
    approve_reset(server, mas, user)
    new = user.keys()
    response = user.upload(new.body())
    assert response.status_code == 200, response.text
    assert user.stored_public_keys()["master"] == new.master.public
    assert decisions(server, user)[-1] == "rule=replacement_window outcome=uploaded"
    # The approval was for one reset: the next one is refused again.
    assert_delegated_refusal(user.upload(user.keys().body()), mas)
    assert user.stored_public_keys()["master"] == new.master.public


def test_admin_window_through_the_module_under_delegated_auth(
    server: SynapseServer, mas: FakeMas
) -> None:
    """An admin (by the scope of their token) grants and revokes through the module's
    admin API; a non-admin token is refused."""
    admin = new_user(server, mas, admin=True)
    user = new_user(server, mas)
    keys = user.keys()
    assert user.upload(keys.body()).status_code == 200
    path = f"/_synapse/admin/v1/users/{user.user_id}/_allow_cross_signing_replacement_without_uia"
    refused = user.request("POST", path, {})
    assert (refused.status_code, refused.json()["errcode"]) == (403, "M_FORBIDDEN")
    granted = admin.request("POST", path, {})
    assert granted.status_code == 200, granted.text
    assert isinstance(granted.json()["updatable_without_uia_before_ms"], int)
    assert admin.request("DELETE", path).status_code == 200
    assert_delegated_refusal(user.upload(user.keys().body()), mas)
    assert admin.request("POST", path, {}).status_code == 200
    new = user.keys()
    assert user.upload(new.body()).status_code == 200
    assert user.stored_public_keys()["master"] == new.master.public


def test_first_upload_toggle_off_keeps_synapse_answer(mas: FakeMas) -> None:
    """With `first_upload_without_uia: false` the module does not exempt a first upload;
    under delegated auth the request then gets Synapse's own answer, which lets a first
    upload through (there is no UIA to ask for, and no key yet for MAS to approve a
    reset of)."""
    with SynapseServer(
        {"first_upload_without_uia": False},
        extra_config=delegated_auth_config(mas),
        name="mas-toggle",
    ) as server:
        user = new_user(server, mas)
        keys = user.keys()
        response = user.upload(keys.body())
        assert response.status_code == 200, response.text
        assert user.stored_public_keys()["master"] == keys.master.public
        assert decisions(server, user) == ["rule=delegated_auth outcome=delegated:200"]
