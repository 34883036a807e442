"""libnftables adapter: read back our tables, apply one batch atomically.

Runs in the caller's network namespace (the agent is started inside the lb's
namespace with ``ip netns exec``). Only tables named in
:data:`protego.lb.ruleset.OWNED_TABLES` are ever listed, changed or deleted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from protego.errors import DataplaneError
from protego.lb import ruleset

log = logging.getLogger(__name__)


class NftAdapter:
    def __init__(self, nft: Any | None = None) -> None:
        if nft is None:
            try:
                import nftables  # type: ignore[import-untyped]  # Debian python3-nftables
            except ImportError as exc:  # pragma: no cover - environment problem
                raise DataplaneError("python3-nftables (libnftables) is not importable") from exc
            nft = nftables.Nftables()
        self._nft = nft
        self._lock = threading.Lock()
        self.last_apply_ms = 0.0

    def _run(self, cmd: str, json_out: bool) -> str:
        with self._lock:
            self._nft.set_json_output(json_out)
            rc, out, err = self._nft.cmd(cmd)
        if rc != 0:
            raise DataplaneError(f"nft: {err.strip() or 'failed'} (command: {cmd[:300]!r})", rc)
        return str(out)

    def read(self, table: str) -> ruleset.Installed | None:
        if table not in ruleset.OWNED_TABLES:
            raise DataplaneError(f"refusing to read table {table!r}: not ours")
        with self._lock:
            self._nft.set_json_output(True)
            rc, out, err = self._nft.cmd(f"list table {ruleset.FAMILY} {table}")
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise DataplaneError(f"nft list table {table}: {err.strip()}", rc)
        return ruleset.parse_installed(json.loads(out), table)

    def apply(self, commands: list[str]) -> None:
        """Send ``commands`` as ONE transaction (all or nothing)."""
        if not commands:
            return
        for c in commands:
            if f" {ruleset.FAMILY} " not in c or not any(f" {ruleset.FAMILY} {t}" in c
                                                         for t in ruleset.OWNED_TABLES):
                raise DataplaneError(f"refusing a command outside our tables: {c[:120]!r}")
        t0 = time.perf_counter()
        self._run("\n".join(commands) + "\n", False)
        self.last_apply_ms = (time.perf_counter() - t0) * 1000
        log.debug("nft batch of %d commands applied in %.2f ms", len(commands), self.last_apply_ms)

    def counters(self, table: str) -> dict[str, tuple[int, int]]:
        """Named counters of our table: name -> (packets, bytes)."""
        if table not in ruleset.OWNED_TABLES:
            raise DataplaneError(f"refusing to read table {table!r}: not ours")
        try:
            out = self._run(f"list counters table {ruleset.FAMILY} {table}", True)
        except DataplaneError:
            return {}
        res = {}
        for item in json.loads(out).get("nftables", []):
            c = item.get("counter")
            if c and c.get("table") == table:
                res[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        return res

    def delete_owned(self) -> list[str]:
        """Delete our tables (the ones whose rules all carry our tag)."""
        gone = []
        for t in ruleset.OWNED_TABLES:
            inst = self.read(t)
            if inst is None:
                continue
            if not ruleset.owned(inst):
                log.warning("table %s %s has rules without our tag; leaving it alone", ruleset.FAMILY, t)
                continue
            self.apply(ruleset.delete_table(t))
            gone.append(t)
        return gone
