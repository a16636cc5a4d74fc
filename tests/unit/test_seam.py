"""The start-up self-check of the Synapse seam: outside the supported range, or with a
private name missing, the module refuses to start and says which Synapse it supports."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import synapse
from synapse.module_api.errors import ConfigError

from synapse_xsign_uia import _synapse


@pytest.mark.parametrize("version", ["1.98.0", "1.120.2", "1.140.0rc1", "1.163.2"])
def test_supported_versions(version: str) -> None:
    _synapse.check_synapse_version(version)


@pytest.mark.parametrize("version", ["1.97.0", "1.96.1", "1.163.3", "1.164.0", "2.0.0"])
def test_unsupported_versions(version: str) -> None:
    with pytest.raises(ConfigError) as info:
        _synapse.check_synapse_version(version)
    assert "Synapse 1.98.0 to 1.163.2" in str(info.value)
    assert version in str(info.value)


def test_installed_synapse_is_supported() -> None:
    _synapse.check_synapse_version()


def test_every_private_name_resolves() -> None:
    for name in _synapse.REQUIRED_NAMES:
        assert _synapse.resolve(name) is not None


def test_missing_name() -> None:
    with pytest.raises(ConfigError) as info:
        _synapse.resolve("synapse.rest.client.keys:NoSuchServlet")
    message = str(info.value)
    assert "synapse.rest.client.keys.NoSuchServlet is missing" in message
    assert "Synapse 1.98.0 to 1.163.2" in message


def fake_homeserver(worker_app: str | None = None, **missing: bool) -> Any:
    store = SimpleNamespace(
        **{
            m: lambda: None
            for m in (*_synapse.REQUIRED_STORE_METHODS, *_synapse.REQUIRED_WRITER_STORE_METHODS)
            if m not in missing
        }
    )
    if "runInteraction" not in missing:
        store.db_pool = SimpleNamespace(runInteraction=lambda: None)
    if "get_next_mult" not in missing:
        store._cross_signing_id_gen = SimpleNamespace(get_next_mult=lambda: None)
    if "get_immediate" not in missing:
        store._get_bare_e2e_cross_signing_keys = SimpleNamespace(
            cache=SimpleNamespace(get_immediate=lambda: None), invalidate=lambda: None
        )
    handler = SimpleNamespace(
        **{
            m: lambda: None
            for required in (
                _synapse.REQUIRED_HANDLER_METHODS,
                _synapse.REQUIRED_WRITER_HANDLER_METHODS,
            )
            for methods in required.values()
            for m in methods
            if m not in missing
        }
    )
    methods: dict[str, Any] = {m: (lambda: handler) for m in _synapse.REQUIRED_HS_METHODS}
    methods["get_datastores"] = lambda: SimpleNamespace(main=store)
    for name in missing:
        methods.pop(name, None)
    config = SimpleNamespace(worker=SimpleNamespace(worker_app=worker_app))
    return SimpleNamespace(config=config, **methods)


def test_complete_homeserver_passes() -> None:
    _synapse.check_internals(fake_homeserver())


def test_missing_homeserver_method() -> None:
    with pytest.raises(ConfigError) as info:
        _synapse.check_internals(fake_homeserver(get_auth_handler=True))
    assert "HomeServer.get_auth_handler is missing" in str(info.value)
    assert "Synapse 1.98.0 to 1.163.2" in str(info.value)


def test_missing_store_method() -> None:
    with pytest.raises(ConfigError) as info:
        _synapse.check_internals(fake_homeserver(get_e2e_cross_signing_keys_bulk=True))
    assert "get_e2e_cross_signing_keys_bulk" in str(info.value)
    assert "Synapse 1.98.0 to 1.163.2" in str(info.value)


def test_missing_keys_cache() -> None:
    with pytest.raises(ConfigError) as info:
        _synapse.check_internals(fake_homeserver(get_immediate=True))
    assert "_get_bare_e2e_cross_signing_keys" in str(info.value)
    assert "Synapse 1.98.0 to 1.163.2" in str(info.value)


def test_a_process_that_writes_keys_needs_the_device_notifications(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError) as info:
        _synapse.check_internals(fake_homeserver(notify_device_update=True))
    assert "notify_device_update is missing" in str(info.value)
    # A worker of a release that serves uploads on the main process only does not.
    monkeypatch.setattr(synapse, "__version__", "1.98.0")
    _synapse.check_internals(
        fake_homeserver("synapse.app.generic_worker", notify_device_update=True)
    )
    monkeypatch.setattr(synapse, "__version__", "1.135.0")
    with pytest.raises(ConfigError):
        _synapse.check_internals(
            fake_homeserver("synapse.app.generic_worker", notify_device_update=True)
        )


def test_missing_stream_id_generator() -> None:
    with pytest.raises(ConfigError) as info:
        _synapse.check_internals(fake_homeserver(get_next_mult=True))
    assert "_cross_signing_id_gen.get_next_mult" in str(info.value)
    assert "Synapse 1.98.0 to 1.163.2" in str(info.value)


def test_missing_key_transaction_function() -> None:
    with pytest.raises(ConfigError) as info:
        _synapse.check_internals(fake_homeserver(_set_e2e_cross_signing_key_txn=True))
    assert "_set_e2e_cross_signing_key_txn" in str(info.value)
    assert "Synapse 1.98.0 to 1.163.2" in str(info.value)


def test_missing_database_pool_method() -> None:
    with pytest.raises(ConfigError) as info:
        _synapse.check_internals(fake_homeserver(runInteraction=True))
    assert "db_pool.runInteraction" in str(info.value)
    assert "Synapse 1.98.0 to 1.163.2" in str(info.value)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("1.98.0", (1, 98, 0)),
        ("1.163.2", (1, 163, 2)),
        ("1.120.0rc1", (1, 120, 0)),
        ("1.99", (1, 99, 0)),
    ],
)
def test_parse_version(text: str, parsed: tuple[int, int, int]) -> None:
    assert _synapse.parse_version(text) == parsed
