"""What every CLI command shares: where etcd is, resolved once per invocation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protego.errors import ConfigError

if TYPE_CHECKING:
    from protego.store.etcd import Etcd


@dataclass
class CliContext:
    etcd_option: str | None = None  # --etcd / PROTEGO_ETCD: comma-separated endpoints
    testbed_option: str | None = None  # --testbed / PROTEGO_TESTBED
    _etcd: "Etcd | None" = field(default=None, repr=False)

    def etcd_endpoints(self) -> list[str]:
        if self.etcd_option:
            eps = [e.strip() for e in self.etcd_option.split(",") if e.strip()]
            if not eps:
                raise ConfigError("--etcd: no endpoint given")
            return eps
        from protego.testbed.state import TestbedState, list_testbeds

        name = self.testbed_option
        if name is None:
            running = list_testbeds()
            if len(running) != 1:
                raise ConfigError(
                    "where is etcd? give --etcd HOST:PORT[,...] (or PROTEGO_ETCD), or --testbed NAME"
                    + (f" (testbeds: {', '.join(running)})" if running else "")
                )
            name = running[0]
        eps = TestbedState.load(name).etcd_endpoints
        if not eps:
            raise ConfigError(f"testbed {name} has no etcd endpoints (is it up?)")
        return list(eps)

    def etcd(self) -> "Etcd":
        if self._etcd is None:
            from protego.store.etcd import etcd_from_env

            # credentials as the Ansible roles install them (/etc/protego/etcd-client.env)
            self._etcd = etcd_from_env(self.etcd_endpoints())
        return self._etcd

    def close(self) -> None:
        if self._etcd is not None:
            self._etcd.close()
            self._etcd = None
