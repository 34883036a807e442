"""The HA mirror in an etcd with authentication, set up exactly as the Ansible role does
(its own shell script, run against a real etcd with the real etcdctl): only the GMNs'
user reaches ``/protego/ha/``; the relay writes the mirror as that user, fenced on the
GMN's leadership; no key material reaches the logs."""

from __future__ import annotations

import logging
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protego.errors import ProtegoError
from protego.gmn import ha
from protego.gmn.ha_service import HaService
from protego.store.etcd import Etcd, encode_json
from protego.store.server import EtcdCluster
from tests.conftest import wait_until
from tests.unit.test_ansible_roles import tasks_of
from tests.unit.test_gmn_ha import child_add, ike_add, ike_id, ike_update, mid

LEADER = "/protego/v1/gmn/leader"


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("etcdauth")
    c = EtcdCluster("ptestha", base / "data", base / "log")
    c.start()
    pw = {k: secrets.token_hex(16) for k in ("root", "agent", "gmn")}  # in memory only
    try:
        task = next(t for t in tasks_of("protego_etcd") if t["name"] == "Set up etcd authentication")
        env = {"PATH": "/usr/bin:/bin", "EP": c.client_urls[0], "ROOT_PW": pw["root"], "AGENT_USER": "protego",
               "AGENT_PW": pw["agent"], "PREFIX": "/protego/v1/", "GMN_USER": "protego-gmn", "GMN_PW": pw["gmn"],
               "HA_PREFIX": "/protego/ha/"}
        done = subprocess.run(["bash", "-c", task["ansible.builtin.shell"]["cmd"]], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "changed"
        yield {"cluster": c, "pw": pw}
    finally:
        c.destroy()


def client(authed: dict[str, Any], who: str | None) -> Etcd:
    users = {"agent": "protego", "gmn": "protego-gmn", "root": "root"}
    if who is None:
        return Etcd(authed["cluster"].endpoints, timeout=2.0, attempts=1)
    return Etcd(authed["cluster"].endpoints, timeout=2.0, attempts=1, user=users[who], password=authed["pw"][who])


def test_only_the_gmn_user_reaches_the_ha_mirror(authed: dict[str, Any]) -> None:
    gmn, agent, anon = client(authed, "gmn"), client(authed, "agent"), client(authed, None)
    try:
        gmn.put(ha.HA_PREFIX + "probe", b"x")
        assert gmn.get(ha.HA_PREFIX + "probe") is not None
        gmn.put("/protego/v1/gmn/members/probe", b"{}")  # and the rest of Protego's keys
        agent.put("/protego/v1/probe", b"y")
        assert agent.get("/protego/v1/gmn/members/probe") is not None
        for op in (lambda: agent.get(ha.HA_PREFIX + "probe"), lambda: agent.get_prefix(ha.HA_PREFIX),
                   lambda: agent.put(ha.HA_PREFIX + "x", b"z")):
            with pytest.raises(ProtegoError, match="permission denied"):
                op()
        with pytest.raises(ProtegoError, match="user name is empty"):
            anon.get("/protego/v1/probe")
    finally:
        for e in (gmn, agent, anon):
            e.close()


def test_relay_mirrors_as_the_gmn_user_fenced_on_leadership(authed: dict[str, Any],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gmn, agent = client(authed, "gmn"), client(authed, "agent")
    port = 20000 + secrets.randbelow(20000)
    svc = HaService("gmnx", gmn, "/nonexistent/charon.vici", LEADER, port=port)
    charon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # stands in for charon's ha socket
    secret = secrets.token_bytes(32)
    try:
        charon.bind((ha.CHARON_HA_ADDR, port))
        svc.start()
        lease = gmn.lease(10)
        gmn.put(LEADER, encode_json({"node": "gmnx"}), lease=lease)
        svc.lease, svc.active = lease.id, True  # what activate() ends with (it needs a charon)
        a = ike_id(0x51)
        sent = [ike_add(a, secret=secret), ike_update(a), mid(a, 1), child_add(a, 0xC0DE0001), mid(a, 2)]
        for m in sent:
            charon.sendto(m, (ha.AGENT_HA_ADDR, port))

        def mirrored() -> list[bytes] | None:
            kv = gmn.get(ha.entry_key(a))
            return ha.decode_entry(kv.value) if kv else None

        wait_until(lambda: mirrored() == [sent[0], sent[1], sent[3], sent[4]], 5, "the mirror entry")
        with pytest.raises(ProtegoError, match="permission denied"):
            agent.get(ha.entry_key(a))
        assert svc.stats()["mirrored"] == 5 and svc.hist.snapshot()["count"] == 5

        # leadership gone (another GMN took over): the next write is refused, not applied
        gmn.delete(LEADER)
        charon.sendto(mid(a, 3), (ha.AGENT_HA_ADDR, port))
        wait_until(lambda: not svc.active, 5, "the relay to notice it is fenced")
        assert svc.counts["fenced"] == 1
        time.sleep(0.2)
        assert mirrored() == [sent[0], sent[1], sent[3], sent[4]]
        lease.revoke()
    finally:
        svc.stop()
        charon.close()
        gmn.delete_prefix(ha.HA_PREFIX)
        gmn.close()
        agent.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for form in (secret.hex(), secret.hex().upper(), repr(secret)):
        assert form not in logged
