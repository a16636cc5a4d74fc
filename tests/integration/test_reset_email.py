"""The identity-reset email (`notify_on_reset.email`): a real SMTP server, started by the
tests, receives one email per reset at each of the user's verified addresses, saying when the
master key was replaced, how, and from which device and IP address; none for a first upload
or a refused request; and Synapse refuses to start with the email on but no way to send it."""

from __future__ import annotations

import email
import email.policy
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any
from urllib.parse import quote

import pytest
from aiosmtpd.controller import Controller

from tests.harness.client import User, register_user
from tests.harness.server import SynapseServer, free_port
from tests.integration.test_reset_notice import ISO_TIME
from tests.integration.test_upload import login_with_device

pytestmark = pytest.mark.synapse

WAIT_S = 30.0
QUIET_S = 3.0
DEVICE_NAME = "Alice's laptop"


class Mailbox:
    """An SMTP server on loopback that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._lock:
            self.messages.append(message)
        return "250 Message accepted for delivery"

    def start(self) -> Mailbox:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def to(self, address: str) -> list[EmailMessage]:
        with self._lock:
            return [m for m in self.messages if address in str(m["To"])]

    def wait_for(self, address: str, count: int) -> list[EmailMessage]:
        deadline = time.monotonic() + WAIT_S
        while len(self.to(address)) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.to(address)


@pytest.fixture(scope="module")
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox().start()
    yield box
    box.stop()


def email_config(port: int) -> dict[str, Any]:
    return {
        "email": {
            "smtp_host": "127.0.0.1",
            "smtp_port": port,
            "notif_from": "Matrix <noreply@localhost>",
            "enable_tls": False,
            "require_transport_security": False,
        }
    }


@pytest.fixture(scope="module")
def email_server(mailbox: Mailbox) -> Iterator[SynapseServer]:
    server = SynapseServer(
        {"notify_on_reset": {"email": True}},
        extra_config=email_config(mailbox.port),
        name="email",
    )
    server.start()
    yield server
    server.stop()


def user_with_email(server: SynapseServer, *addresses: str) -> User:
    admin = register_user(server.base_url, server.shared_secret, admin=True)
    user = register_user(server.base_url, server.shared_secret)
    # The admin API stores addresses as verified.
    response = admin.request(
        "PUT",
        f"/_synapse/admin/v2/users/{quote(user.user_id)}",
        {"threepids": [{"medium": "email", "address": a} for a in addresses]},
    )
    assert response.status_code == 200, response.text
    response = user.request(
        "PUT", f"/_matrix/client/v3/devices/{user.device_id}", {"display_name": DEVICE_NAME}
    )
    assert response.status_code == 200, response.text
    return user


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def test_a_reset_sends_one_email_to_each_verified_address(
    email_server: SynapseServer, mailbox: Mailbox
) -> None:
    user = user_with_email(email_server, "alice@example.org", "alice@example.net")
    assert user.upload(user.keys().body()).status_code == 200
    before = time.time()
    response = user.upload_with_uia(user.keys().body())
    assert response.status_code == 200, response.text

    for address in ("alice@example.org", "alice@example.net"):
        messages = mailbox.wait_for(address, 1)
        assert len(messages) == 1, messages
        message = messages[0]
        assert message["Subject"] == "Your cross-signing identity on localhost was replaced"
        assert "noreply@localhost" in str(message["From"])
        text = text_of(message)
        assert user.user_id in text
        assert "re-authentication with the account's password" in text
        assert f"{user.device_id} ({DEVICE_NAME})" in text
        assert "127.0.0.1" in text
        match = ISO_TIME.search(text)
        assert match is not None, text
        html = message.get_body(preferencelist=("html",))
        assert html is not None and user.user_id in str(html.get_content())
    assert int(before) - 1 <= time.time()
    # Exactly one, even after a while.
    time.sleep(QUIET_S)
    assert len(mailbox.to("alice@example.org")) == 1


def test_the_device_that_reset_is_named(email_server: SynapseServer, mailbox: Mailbox) -> None:
    user = user_with_email(email_server, "bob@example.org")
    assert user.upload(user.keys().body()).status_code == 200
    laptop = login_with_device(email_server, user, "OTHERDEVICE")
    assert laptop.upload_with_uia(user.keys().body()).status_code == 200
    (message,) = mailbox.wait_for("bob@example.org", 1)
    assert "OTHERDEVICE" in text_of(message)


def test_no_email_for_a_first_upload_or_a_refused_request(
    email_server: SynapseServer, mailbox: Mailbox
) -> None:
    user = user_with_email(email_server, "carol@example.org")
    keys = user.keys()
    assert user.upload(keys.body()).status_code == 200
    # Refused: a challenge, then a wrong password.
    replacement = user.keys()
    challenge = user.upload(replacement.body())
    assert challenge.status_code == 401
    wrong = {**user.password_auth(challenge.json()["session"]), "password": "wrong"}
    assert user.upload({**replacement.body(), "auth": wrong}).status_code == 401
    assert user.stored_public_keys()["master"] == keys.master.public
    time.sleep(QUIET_S)
    assert mailbox.to("carol@example.org") == []


def test_email_without_a_way_to_send_stops_synapse() -> None:
    server = SynapseServer({"notify_on_reset": {"email": True}}, name="emailconfig")
    try:
        with pytest.raises(RuntimeError, match="exited") as info:
            server.start(timeout=120)
        message = str(info.value)
        assert "'notify_on_reset.email'" in message
        assert "notif_from" in message
    finally:
        server.stop()
