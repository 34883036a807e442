"""The NETLINK_XFRM socket layer: send encoded messages, read ACKs and dumps.

This is the only module of :mod:`protego.xfrm` that touches sockets. The socket
is injected (tests pass a fake over ``socketpair()``); :func:`open_xfrm_socket`
opens a real one in the current network namespace, in a named one, or in a
fresh anonymous one. Opening in another namespace forks a short-lived child that
enters the namespace, creates the socket and passes the descriptor back
(``SCM_RIGHTS``); the calling process never calls ``setns()`` itself, so it is
safe in a threaded process. A netlink socket stays bound to the namespace it was
created in.

Errors carry the errno: :class:`protego.errors.DataplaneError` with ``.errno``.
``NETLINK_CAP_ACK`` is set so the kernel does not echo requests (which carry
keys) back in error messages.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import os
import socket
import struct
from typing import Protocol, Self

from protego.errors import DataplaneError

from .constants import (
    MSG_NAMES,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_XFRM,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    SOL_NETLINK,
    XFRM_MSG_NEWPOLICY,
    XFRM_MSG_NEWSA,
)
from .messages import (
    NLMSG_HDR,
    Mark,
    NetlinkMessage,
    Selector,
    XfrmPolicy,
    XfrmState,
    decode_error,
    decode_policy,
    decode_state,
    encode_policy,
    encode_policy_delete,
    encode_policy_dump,
    encode_state,
    encode_state_delete,
    encode_state_dump,
    encode_state_get,
    iter_messages,
)

__all__ = ["CLONE_NEWNET", "NetlinkSocketLike", "XfrmError", "XfrmSocket", "open_xfrm_socket"]

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
_RECV_SIZE = 1 << 16
REPLY_TIMEOUT = 5.0  # seconds; the kernel answers at once, this only bounds a bug


class XfrmError(DataplaneError):
    """The kernel refused an XFRM request; ``kernel_message`` is its extended ACK
    text (may be empty), ``errno`` the positive errno."""

    def __init__(self, message: str, errno: int | None = None,
                 kernel_message: str = "") -> None:
        super().__init__(message, errno)
        self.kernel_message = kernel_message


class NetlinkSocketLike(Protocol):
    def send(self, data: bytes) -> int: ...

    def recv(self, bufsize: int) -> bytes: ...

    def close(self) -> None: ...


def _errname(code: int) -> str:
    return errno_mod.errorcode.get(code, str(code))


class XfrmSocket:
    """Request/response on a NETLINK_XFRM socket."""

    def __init__(self, sock: NetlinkSocketLike) -> None:
        self._sock = sock
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _send(self, msg: bytes) -> tuple[int, int]:
        seq = self._next_seq()
        length, kind, flags, _seq, pid = NLMSG_HDR.unpack_from(msg)
        self._sock.send(NLMSG_HDR.pack(length, kind, flags, seq, pid) + msg[16:])
        return seq, kind

    def _recv(self) -> list[NetlinkMessage]:
        try:
            data = self._sock.recv(_RECV_SIZE)
        except OSError as exc:
            raise DataplaneError(f"xfrm netlink receive failed: {exc.strerror or exc}",
                                 exc.errno or errno_mod.ETIMEDOUT) from None
        return list(iter_messages(data))

    def _raise(self, kind: int, msg: NetlinkMessage) -> None:
        err = decode_error(msg)
        code = -err.error
        detail = f": {err.message}" if err.message else ""
        raise XfrmError(
            f"xfrm {MSG_NAMES.get(kind, hex(kind))} failed{detail} "
            f"({_errname(code)}: {os.strerror(code)})", code, err.message)

    def request(self, msg: bytes) -> None:
        """Send a request that the kernel ACKs (add/update/delete)."""
        seq, kind = self._send(msg)
        while True:
            for reply in self._recv():
                if reply.seq != seq or reply.type == NLMSG_NOOP:
                    continue
                if reply.type == NLMSG_ERROR:
                    if decode_error(reply).error == 0:
                        return
                    self._raise(kind, reply)
                raise DataplaneError(f"xfrm: unexpected reply type {reply.type}")

    def query(self, msg: bytes) -> NetlinkMessage:
        """Send a GET request and return the single answer."""
        seq, kind = self._send(msg)
        while True:
            for reply in self._recv():
                if reply.seq != seq or reply.type == NLMSG_NOOP:
                    continue
                if reply.type == NLMSG_ERROR:
                    self._raise(kind, reply)
                return reply

    def dump(self, msg: bytes) -> list[NetlinkMessage]:
        """Send a dump request and collect every message up to ``NLMSG_DONE``."""
        seq, kind = self._send(msg)
        out: list[NetlinkMessage] = []
        while True:
            for reply in self._recv():
                if reply.seq != seq or reply.type == NLMSG_NOOP:
                    continue
                if reply.type == NLMSG_DONE:
                    return out
                if reply.type == NLMSG_ERROR:
                    self._raise(kind, reply)
                out.append(reply)

    # ----------------------------------------------------------- high level

    def add_state(self, state: XfrmState) -> None:
        self.request(encode_state(state))

    def update_state(self, state: XfrmState) -> None:
        self.request(encode_state(state, update=True))

    def delete_state(self, dst: str, spi: int, src: str | None = None,
                     mark: Mark | None = None) -> None:
        self.request(encode_state_delete(dst, spi, src, mark=mark))

    def get_state(self, dst: str, spi: int, src: str | None = None,
                  mark: Mark | None = None) -> XfrmState:
        reply = self.query(encode_state_get(dst, spi, src, mark=mark))
        return decode_state(reply.payload)

    def dump_states(self) -> list[XfrmState]:
        return [decode_state(m.payload) for m in self.dump(encode_state_dump())
                if m.type == XFRM_MSG_NEWSA]

    def add_policy(self, policy: XfrmPolicy) -> None:
        self.request(encode_policy(policy))

    def update_policy(self, policy: XfrmPolicy) -> None:
        self.request(encode_policy(policy, update=True))

    def delete_policy(self, selector: Selector, direction: int,
                      mark: Mark | None = None, if_id: int | None = None) -> None:
        self.request(encode_policy_delete(selector, direction, mark=mark, if_id=if_id))

    def dump_policies(self) -> list[XfrmPolicy]:
        return [decode_policy(m.payload) for m in self.dump(encode_policy_dump())
                if m.type == XFRM_MSG_NEWPOLICY]


# ------------------------------------------------------------------ opening

def _raw_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
        try:
            sock.setsockopt(SOL_NETLINK, opt, 1)
        except OSError:  # old kernels: plain ACKs are fine
            pass
    sock.bind((0, 0))
    sock.settimeout(REPLY_TIMEOUT)
    return sock


def _libc_call(name: str, *args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _socket_from_child(netns_path: str | None) -> socket.socket:
    """Fork a child that enters ``netns_path`` (or a new netns if ``None``),
    creates the XFRM socket and hands its descriptor back."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pid = os.fork()
    if pid == 0:  # child: only syscalls, then _exit
        code = 0
        try:
            parent_end.close()
            if netns_path is None:
                _libc_call("unshare", CLONE_NEWNET)
            else:
                fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
                _libc_call("setns", fd, CLONE_NEWNET)
                os.close(fd)
            sock = _raw_socket()
            socket.send_fds(child_end, [b"ok"], [sock.fileno()])
        except OSError as exc:
            code = 1
            try:
                child_end.send(struct.pack("=i", exc.errno or 0) + str(exc).encode())
            except OSError:
                pass
        except BaseException:  # noqa: BLE001 - never return into the parent's code
            code = 2
        finally:
            os._exit(code)
    child_end.close()
    try:
        data, fds, _flags, _addr = socket.recv_fds(parent_end, 4096, 1)
    finally:
        parent_end.close()
        os.waitpid(pid, 0)
    if fds:
        sock = socket.socket(fileno=fds[0])
        sock.settimeout(REPLY_TIMEOUT)
        return sock
    if len(data) >= 4:
        (code,) = struct.unpack_from("=i", data)
        raise DataplaneError(
            f"cannot open an XFRM socket in {netns_path or 'a new netns'}: "
            f"{data[4:].decode(errors='replace')}", code or None)
    raise DataplaneError(f"cannot open an XFRM socket in {netns_path or 'a new netns'}")


def open_xfrm_socket(netns: str | None = None, new_netns: bool = False) -> XfrmSocket:
    """Open an :class:`XfrmSocket`.

    ``netns``: a name under ``/run/netns`` (or an absolute path); ``new_netns``:
    a fresh, anonymous namespace that disappears with the socket. Default: the
    current namespace.
    """
    try:
        if new_netns:
            return XfrmSocket(_socket_from_child(None))
        if netns is not None:
            path = netns if netns.startswith("/") else f"/run/netns/{netns}"
            return XfrmSocket(_socket_from_child(path))
        return XfrmSocket(_raw_socket())
    except OSError as exc:
        raise DataplaneError(f"cannot open an XFRM netlink socket: {exc.strerror}",
                             exc.errno) from None
