"""Shared fixtures: real Synapse processes, started once per test session per configuration."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness.client import User, register_user
from tests.harness.server import SynapseServer
from tests.harness.workers import WorkerDeployment, skip_without_worker_requirements

ServerFactory = Callable[..., SynapseServer]


@pytest.fixture(scope="session")
def synapse_server() -> Iterator[ServerFactory]:
    """`synapse_server(module_config, with_module=True, extra_config=None)` returns a running
    homeserver, shared by every test that asks for the same configuration."""
    servers: dict[str, SynapseServer] = {}

    def get(
        module_config: dict[str, Any] | None = None,
        *,
        with_module: bool = True,
        extra_config: dict[str, Any] | None = None,
    ) -> SynapseServer:
        key = json.dumps([module_config, with_module, extra_config], sort_keys=True)
        if key not in servers:
            name = "module" if with_module else "native"
            servers[key] = SynapseServer(
                module_config, with_module=with_module, extra_config=extra_config, name=name
            ).start()
        return servers[key]

    yield get
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def server(synapse_server: ServerFactory) -> SynapseServer:
    """Synapse with the module and its default configuration."""
    return synapse_server({})


@pytest.fixture(scope="session")
def native_server(synapse_server: ServerFactory) -> SynapseServer:
    """Synapse without the module, for comparison."""
    return synapse_server(with_module=False)


@pytest.fixture
def user(server: SynapseServer) -> User:
    return register_user(server.base_url, server.shared_secret)


@pytest.fixture
def admin(server: SynapseServer) -> User:
    return register_user(server.base_url, server.shared_secret, admin=True)


@pytest.fixture(scope="module")
def deployment() -> Iterator[WorkerDeployment]:
    """PostgreSQL, Redis, a main process and a worker, with the module's default
    configuration; one per test module (a module may define its own, configured otherwise)."""
    skip_without_worker_requirements()
    deployment = WorkerDeployment().start()
    yield deployment
    deployment.stop()
