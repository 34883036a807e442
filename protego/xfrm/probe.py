"""Start-up probe: can this kernel do ESP (and which backend do we use)?

:func:`probe_kernel_esp` adds a throwaway ESP SA for each suite family we use
(AES-GCM and AES-CBC + HMAC-SHA-256) in a fresh, anonymous network namespace
(it vanishes with the probe's socket: nothing to clean up, nothing touches the
host's SAD) and reports the outcome in one clear line. The throwaway key is
random and never leaves this function.
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from protego.errors import DataplaneError

from .constants import (
    XFRM_STATE_ESN,
    XFRMA_ALG_AEAD,
    XFRMA_ALG_AUTH_TRUNC,
    XFRMA_ALG_CRYPT,
)
from .messages import Algorithm, XfrmState, encode_state, encode_state_delete
from .netlink import XfrmError, XfrmSocket, open_xfrm_socket

__all__ = ["BACKEND_USERSPACE", "BACKEND_XFRM", "EspProbeResult", "probe_kernel_esp"]

log = logging.getLogger(__name__)

BACKEND_XFRM = "xfrm"
BACKEND_USERSPACE = "userspace"

_PROBE_SRC = ipaddress.IPv4Address("198.18.0.1")
_PROBE_DST = ipaddress.IPv4Address("198.18.0.2")
_PROBE_SPI = 0x0000_0100


def _probe_states() -> list[tuple[str, XfrmState]]:
    gcm = XfrmState(
        src=_PROBE_SRC, dst=_PROBE_DST, spi=_PROBE_SPI, reqid=1, replay_window=64,
        flags=XFRM_STATE_ESN,
        algorithms=(Algorithm(XFRMA_ALG_AEAD, "rfc4106(gcm(aes))", os.urandom(20), 128),))
    cbc = XfrmState(
        src=_PROBE_SRC, dst=_PROBE_DST, spi=_PROBE_SPI + 1, reqid=1, replay_window=64,
        algorithms=(Algorithm(XFRMA_ALG_CRYPT, "cbc(aes)", os.urandom(16)),
                    Algorithm(XFRMA_ALG_AUTH_TRUNC, "hmac(sha256)", os.urandom(32), 128)))
    return [("aes128gcm16", gcm), ("aes128-sha256", cbc)]


@dataclass(frozen=True)
class EspProbeResult:
    kernel_esp: bool
    backend: str
    message: str
    errno: int | None = None
    suites: dict[str, int] = field(default_factory=dict)  # suite -> 0 or errno

    def __str__(self) -> str:
        return self.message


def _describe(code: int, text: str) -> str:
    name = errno_mod.errorcode.get(code, str(code))
    return f"{name}{' ' + text if text else ''}"


def probe_kernel_esp(
    open_socket: Callable[[], XfrmSocket] = lambda: open_xfrm_socket(new_netns=True),
) -> EspProbeResult:
    """Try to add throwaway ESP SAs in a fresh netns; never raises.

    ``open_socket`` is injectable for tests (a fake XFRM socket).
    """
    try:
        sock = open_socket()
    except DataplaneError as exc:
        msg = f"cannot probe kernel ESP ({exc}): using the {BACKEND_USERSPACE} backend"
        log.warning("%s", msg)
        return EspProbeResult(False, BACKEND_USERSPACE, msg, exc.errno)
    results: dict[str, int] = {}
    details: list[str] = []
    first_errno: int | None = None
    try:
        for suite, state in _probe_states():
            try:
                sock.request(encode_state(state))
            except DataplaneError as exc:
                code = exc.errno or 0
                results[suite] = code
                first_errno = first_errno if first_errno is not None else code
                text = exc.kernel_message if isinstance(exc, XfrmError) else ""
                details.append(f"{suite}: {_describe(code, text)}")
                continue
            results[suite] = 0
            try:
                sock.request(encode_state_delete(state.dst, state.spi, state.src))
            except DataplaneError:
                pass  # the namespace disappears with the socket anyway
    finally:
        sock.close()
    working = [s for s, code in results.items() if code == 0]
    if working:
        msg = (f"kernel ESP available ({', '.join(working)}"
               f"{'; missing ' + '; '.join(details) if details else ''}): "
               f"using the {BACKEND_XFRM} backend")
        log.info("%s", msg)
        return EspProbeResult(True, BACKEND_XFRM, msg, None, results)
    msg = f"kernel has no ESP ({'; '.join(details)}): using the {BACKEND_USERSPACE} backend"
    log.warning("%s", msg)
    return EspProbeResult(False, BACKEND_USERSPACE, msg, first_errno, results)
