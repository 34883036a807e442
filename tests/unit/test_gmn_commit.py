"""The GMN's group commit of SA transactions (``protego.gmn.agent._GroupCommit``), against
a real etcd on loopback: transactions submitted while one is in flight commit together
as the next one, in submission order; keys two of them touch split the group; a group
that fails is retried one by one so that only the culprit's submitter sees the error."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from protego.errors import ProtegoError
from protego.gmn.agent import _GroupCommit
from protego.store.etcd import DeleteOp, Etcd, PutOp

P = "/protego/v1/test-commit/"


class GatedEtcd(Etcd):
    """The real client; its first transaction waits for ``gate`` (one in flight)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.txns: list[int] = []  # ops per transaction sent

    def txn(self, compares: Any, success: Any = (), failure: Any = ()) -> Any:  # type: ignore[override]
        success = list(success)
        self.txns.append(len(success))
        if len(self.txns) == 1:
            self.entered.set()
            assert self.gate.wait(10)
        return super().txn(compares, success, failure)


@pytest.fixture
def etcd(etcd_loopback: list[str]) -> Any:
    e = GatedEtcd(etcd_loopback)
    e.delete_prefix(P)
    yield e
    e.delete_prefix(P)
    e.close()


def test_transactions_submitted_meanwhile_commit_together_in_order(etcd: GatedEtcd) -> None:
    revs: list[int] = []
    c = _GroupCommit(etcd, revs.append, name="test-commit")
    try:
        first = c.submit([PutOp(P + "a", b"1")])
        assert etcd.entered.wait(10)
        later = [c.submit([PutOp(P + f"k{i}", b"x"), PutOp(P + f"l{i}", b"y")]) for i in range(3)]
        clash = c.submit([DeleteOp(P + "k0")])  # touches a key of the group: the next one
        etcd.gate.set()
        r0 = first.result(10)
        rs = [f.result(10) for f in later]
        rc = clash.result(10)
        assert r0 < rs[0] == rs[1] == rs[2] < rc
        assert etcd.txns == [1, 6, 1]
        assert revs == [r0, rs[0], rc]
        assert etcd.get(P + "k0") is None and etcd.get(P + "l0") is not None and etcd.get(P + "k2") is not None
    finally:
        c.stop()


def test_a_failed_group_fails_only_its_culprit(etcd: GatedEtcd) -> None:
    c = _GroupCommit(etcd, lambda _r: None, name="test-commit")
    try:
        first = c.submit([PutOp(P + "a", b"1")])
        assert etcd.entered.wait(10)
        good1 = c.submit([PutOp(P + "g1", b"1")])
        bad = c.submit([PutOp(P + "bad", b"1", lease=0x7E57)])  # no such lease: etcd refuses
        good2 = c.submit([PutOp(P + "g2", b"1")])
        etcd.gate.set()
        first.result(10)
        assert good1.result(10) < good2.result(10)
        with pytest.raises(ProtegoError):
            bad.result(10)
        assert etcd.get(P + "g1") is not None and etcd.get(P + "g2") is not None and etcd.get(P + "bad") is None
    finally:
        c.stop()


def test_stop_commits_what_was_submitted_then_refuses(etcd: GatedEtcd) -> None:
    etcd.gate.set()
    c = _GroupCommit(etcd, lambda _r: None, name="test-commit")
    futs = [c.submit([PutOp(P + f"s{i}", b"1")]) for i in range(5)]
    c.stop()
    assert all(f.done() and f.exception() is None for f in futs)
    with pytest.raises(ProtegoError, match="stopping"):
        c.submit([PutOp(P + "late", b"1")])
