"""Protego's error tree.

Every error Protego raises on purpose derives from :class:`ProtegoError`; agents
catch it at their loop boundary, CLI commands turn it into one clear message.
Messages never carry key material.
"""

from __future__ import annotations


class ProtegoError(Exception):
    """Base of every error Protego raises on purpose."""


class ConfigError(ProtegoError):
    """Bad configuration or input (topology, trace, CLI parameters)."""


class ConflictError(ProtegoError):
    """A compare-and-swap lost a race or an object already exists."""


class DataplaneError(ProtegoError):
    """The data path (kernel, nftables, ESP engine) refused an operation."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class PeerError(ProtegoError):
    """A daemon or peer (charon, etcd, another agent) failed or misbehaved."""


class TestbedError(ProtegoError):
    """Creating, inspecting or removing a testbed failed."""

    __test__ = False  # not a pytest test class
