"""Shared pytest fixtures.

Unit tests (tests/unit) need neither root nor sockets.  Tests marked ``root``
build their own network namespaces with unique names and always remove them,
and stop every process they start by PID.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

IS_ROOT = os.geteuid() == 0

# Tests marked ``kernel`` run natively, in the kernel lane (a QEMU guest), or skip.
pytest_plugins = ["tests.lane_plugin"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces, nftables, charon, etcd")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def wait_until(pred: Callable[[], object], timeout: float, what: str, step: float = 0.1) -> object:
    """Poll ``pred`` until it returns something true (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def unique_name(prefix: str = "t") -> str:
    """A short unique testbed/namespace name: letter + 7 hex digits."""
    return prefix[:1] + secrets.token_hex(4)[:7]


@pytest.fixture
def netns_factory() -> Iterator[Callable[[str], str]]:
    """Create bare network namespaces with unique names; all removed on teardown."""
    created: list[str] = []

    def make(label: str = "ns") -> str:
        name = f"pt-{label}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        created.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    yield make
    for name in reversed(created):
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="session")
def etcd_loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """One real etcd member on loopback (free ports) for the whole session; stopped by PID."""
    from protego.store.server import EtcdCluster

    base = tmp_path_factory.mktemp("etcd")
    cluster = EtcdCluster(unique_name("e"), str(base / "data"), str(base / "logs"), members=1)
    cluster.start(wait=True)
    try:
        yield list(cluster.endpoints)
    finally:
        cluster.destroy()


@pytest.fixture
def etcd(etcd_loopback: list[str]) -> Iterator["object"]:
    """An etcd client on an empty Protego keyspace (wiped before and after the test)."""
    from protego.store.etcd import Etcd

    client = Etcd(etcd_loopback)
    client.delete_prefix("/protego/")
    try:
        yield client
    finally:
        client.delete_prefix("/protego/")
        client.close()
