"""A small VICI client: the GMN agent's and the testbed's way to drive charon.

Wraps the ``vici`` package (replies are bytes; ``initiate``/``terminate`` return
generators that must be consumed).  Secrets are passed straight to charon and
never logged or kept.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import vici

from protego.errors import PeerError


def _s(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, list):
        return [_s(x) for x in v]
    if isinstance(v, dict):
        return {k: _s(x) for k, x in v.items()}
    return v


class ViciClient:
    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._session: vici.Session | None = None

    def __enter__(self) -> "ViciClient":
        self.connect()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise PeerError(f"cannot reach charon's VICI socket {self.path}: {exc.strerror}") from None
        self._sock = sock
        self._session = vici.Session(sock)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._session = None

    @property
    def session(self) -> vici.Session:
        if self._session is None:
            self.connect()
        assert self._session is not None
        return self._session

    def version(self) -> dict[str, str]:
        return _s(dict(self.session.version()))  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.version()
                return
            except (OSError, vici.exception.SessionException, PeerError):
                if time.monotonic() > deadline:
                    raise PeerError(f"charon at {self.path} does not answer VICI") from None
                self.close()
                time.sleep(0.1)

    def load_psk(self, secret_id: str, psk: bytes, owners: list[str]) -> None:
        try:
            self.session.load_shared({"id": secret_id, "type": "IKE", "data": psk, "owners": owners})
        except vici.exception.CommandException as exc:
            # the message names the command, never the secret
            raise PeerError(f"charon refused shared secret {secret_id}: {exc}") from None

    def list_sas(self, ike: str | None = None) -> Iterator[dict[str, Any]]:
        """One flat record per IKE_SA: states, SPIs of its newest installed CHILD_SA, counters."""
        filt = {"ike": ike} if ike else {}
        for entry in self.session.list_sas(filt):
            for ike_name, raw in entry.items():
                sa = _s(raw)
                rec: dict[str, Any] = {
                    "ike": ike_name if isinstance(ike_name, str) else ike_name.decode(),
                    "ike_state": sa.get("state"),
                    "ike_spi_i": sa.get("initiator-spi"),
                    "ike_spi_r": sa.get("responder-spi"),
                    "child_state": None,
                }
                children = sa.get("child-sas") or {}
                installed = [c for c in children.values() if c.get("state") == "INSTALLED"]
                # the newest installed CHILD_SA: right after a rekey the old one is still
                # listed as installed until it is deleted
                child = (max(installed, key=lambda c: int(c.get("uniqueid") or 0)) if installed
                         else next(iter(children.values()), None))
                if child:
                    rec.update({
                        "child_state": child.get("state"),
                        "child_id": child.get("uniqueid"),
                        "spi_in": child.get("spi-in"),
                        "spi_out": child.get("spi-out"),
                        "encr": child.get("encr-alg"),
                        "encr_keysize": child.get("encr-keysize"),
                        "bytes_in": int(child.get("bytes-in", 0)),
                        "bytes_out": int(child.get("bytes-out", 0)),
                        "local_ts": child.get("local-ts"),
                        "remote_ts": child.get("remote-ts"),
                    })
                yield rec

    # ------------------------------------------------------------ connections
    def get_conns(self) -> list[str]:
        return [c.decode() if isinstance(c, bytes) else c for c in self.session.get_conns().get("conns", [])]

    def load_conn(self, name: str, body: dict[str, Any]) -> None:
        try:
            self.session.load_conn({name: body})
        except vici.exception.CommandException as exc:
            raise PeerError(f"charon refused connection {name}: {exc}") from None

    def unload_conn(self, name: str) -> None:
        try:
            self.session.unload_conn({"name": name})
        except vici.exception.CommandException as exc:
            raise PeerError(f"charon could not unload connection {name}: {exc}") from None

    def unload_shared(self, secret_id: str) -> None:
        try:
            self.session.unload_shared({"id": secret_id})
        except vici.exception.CommandException as exc:
            raise PeerError(f"charon could not unload shared secret {secret_id}: {exc}") from None

    def get_shared(self) -> list[str]:
        keys = self.session.get_shared().get("keys", [])
        return [k.decode() if isinstance(k, bytes) else k for k in keys]

    def terminate_ike(self, ike: str, timeout_ms: int = 2000) -> None:
        """Close every IKE_SA of connection ``ike`` (consumes VICI's log generator)."""
        try:
            for _ in self.session.terminate({"ike": ike, "timeout": str(timeout_ms), "force": "yes"}):
                pass
        except vici.exception.CommandException:
            pass  # nothing to terminate

    def rekey_child(self, child_id: int | str) -> None:
        try:
            self.session.rekey({"child-id": str(child_id)})
        except vici.exception.CommandException as exc:
            raise PeerError(f"charon could not rekey CHILD_SA {child_id}: {exc}") from None

    def raw_sas(self) -> list[dict[str, Any]]:
        """list-sas as plain dicts (bytes decoded): [{ike_name: {...}}, ...]."""
        return [_s(dict(e)) for e in self.session.list_sas({})]
