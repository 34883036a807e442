"""The far end of the xfrm backend's ESP canary, in a network namespace of its own.

Loopback traffic bypasses IPsec (Linux sets ``disable_xfrm`` and ``disable_policy`` on
``lo``), so a canary that proves the GPN's kernel ESP path must leave the namespace.
The backend forks it into a new, anonymous network namespace (:func:`fork_peer`; it
disappears with the process), creates a veth pair with one end there, and sends the
canary's keys over a socket pair (never a file, never a log line).
Here: the veth end gets its address, the mirror-image ESP-in-UDP SAs and policies are
installed, and every canary datagram that arrives (decrypted by this namespace's
kernel) is sent straight back (encrypted again), to the GPN's encapsulation socket.

Protocol (one JSON object per line): the peer writes ``{"hello": pid}`` once it is in
its namespace, then for every configuration ``{"ifname", "local", "remote", "port",
"natt_port", "spi_in", "spi_out", "key_in", "key_out", "reqid"}`` (keys hex; fresh
each time the GPN installs its end) it replaces its SAs and writes ``{"ready": true}``
or ``{"error": ...}``; it exits when the agent's end closes (the agent is gone).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from typing import IO, Any

from pyroute2 import IPRoute

from protego.errors import DataplaneError
from protego.xfrm.constants import XFRM_MODE_TRANSPORT, XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRMA_ALG_AEAD
from protego.xfrm.messages import Algorithm, Encap, Selector, XfrmPolicy, XfrmState, XfrmTemplate
from protego.xfrm.netlink import open_xfrm_socket

UDP_ENCAP = 100
UDP_ENCAP_ESPINUDP = 2
CLONE_NEWNET = 0x40000000


def canary_sas(local: str, remote: str, port: int, natt_port: int, spi_in: int, spi_out: int,
               key_in: bytes, key_out: bytes, reqid: int, server: bool) -> tuple[list[XfrmState], list[XfrmPolicy]]:
    """The states and policies of one end (``local``) of the canary. The client (the GPN)
    sends from any port to the server's ``port``; the server (this program) answers from
    ``port``. Datagrams leave on ``spi_out`` and arrive on ``spi_in``; the policies match
    only the canary's datagrams, so one that arrives unencrypted is dropped. Transport
    mode, AES-GCM-128, ESP-in-UDP."""
    def alg(key: bytes) -> Algorithm:
        return Algorithm(XFRMA_ALG_AEAD, "rfc4106(gcm(aes))", key, 128)

    encap = Encap(natt_port, natt_port)
    states = [
        XfrmState(src=local, dst=remote, spi=spi_out, mode=XFRM_MODE_TRANSPORT, reqid=reqid, replay_window=64,
                  algorithms=(alg(key_out),), encap=encap),
        XfrmState(src=remote, dst=local, spi=spi_in, mode=XFRM_MODE_TRANSPORT, reqid=reqid, replay_window=64,
                  algorithms=(alg(key_in),), encap=encap),
    ]
    ports = {"sport": port} if server else {"dport": port}
    back = {"dport": port} if server else {"sport": port}
    out_sel = Selector.between(f"{local}/32", f"{remote}/32", proto=socket.IPPROTO_UDP, **ports)
    in_sel = Selector.between(f"{remote}/32", f"{local}/32", proto=socket.IPPROTO_UDP, **back)
    policies = [
        XfrmPolicy(out_sel, XFRM_POLICY_OUT,
                   (XfrmTemplate(src=local, dst=remote, reqid=reqid, mode=XFRM_MODE_TRANSPORT),)),
        XfrmPolicy(in_sel, XFRM_POLICY_IN,
                   (XfrmTemplate(src=remote, dst=local, reqid=reqid, mode=XFRM_MODE_TRANSPORT),)),
    ]
    return states, policies


def _say(w: IO[str], obj: dict[str, Any]) -> None:
    w.write(json.dumps(obj) + "\n")
    w.flush()


def _install(cfg: dict[str, Any], old: tuple[list[XfrmState], list[XfrmPolicy]] | None
             ) -> tuple[list[XfrmState], list[XfrmPolicy]]:
    """This end's SAs for ``cfg`` (fresh SPIs and keys each time the GPN installs its end:
    a replay window never sees a sequence number twice), replacing ``old``."""
    states, policies = canary_sas(cfg["local"], cfg["remote"], cfg["port"], cfg["natt_port"], cfg["spi_in"],
                                  cfg["spi_out"], bytes.fromhex(cfg["key_in"]), bytes.fromhex(cfg["key_out"]),
                                  cfg["reqid"], server=True)
    with open_xfrm_socket() as x:
        if old is not None:
            for st in old[0]:
                x.delete_state(str(st.dst), st.spi, str(st.src))
        for st in states:
            x.add_state(st)
        for pol in policies:
            x.update_policy(pol)
    return states, policies


def _link_up(cfg: dict[str, Any]) -> None:
    deadline = time.monotonic() + 60
    with IPRoute() as ip:
        lo = ip.link_lookup(ifname="lo")[0]
        ip.link("set", index=lo, state="up")
        while not ip.link_lookup(ifname=cfg["ifname"]):
            if time.monotonic() > deadline:
                raise OSError(f"veth end {cfg['ifname']} never arrived")
            time.sleep(0.02)
        idx = ip.link_lookup(ifname=cfg["ifname"])[0]
        ip.addr("add", index=idx, address=cfg["local"], prefixlen=30)
        ip.link("set", index=idx, state="up")


def serve(r: IO[str], w: IO[str]) -> None:
    """The peer's loop, in its own network namespace: configuration lines from ``r``,
    answers to ``w``; returns when ``r`` closes."""
    import os

    _say(w, {"hello": os.getpid()})
    installed = None
    encap = echo = None
    while True:
        socks: list[Any] = [r] + [s for s in (echo, encap) if s is not None]
        ready, _, _ = select.select(socks, [], [])
        if r in ready:
            line = r.readline()
            if not line:
                return  # the agent is gone: this namespace and its veth end go with us
            try:
                cfg = json.loads(line)
                if echo is None:
                    _link_up(cfg)
                    encap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    encap.bind(("0.0.0.0", cfg["natt_port"]))
                    encap.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
                    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    echo.bind((cfg["local"], cfg["port"]))
                installed = _install(cfg, installed)
            except (OSError, ValueError, KeyError, DataplaneError) as exc:
                _say(w, {"error": f"{type(exc).__name__}: {exc}"})
                continue
            finally:
                line = ""
            _say(w, {"ready": True})
        if echo is not None and echo in ready:
            data, src = echo.recvfrom(2048)
            try:
                echo.sendto(data, src)
            except OSError:
                pass
        if encap is not None and encap in ready:
            encap.recvfrom(2048)  # not ESP (the kernel takes ESP): never expected here


def fork_peer() -> tuple[int, socket.socket]:
    """Fork the peer into a new network namespace (call it while the process has no other
    threads: the GPN agent starts its backend first). Returns (pid, the parent's end of a
    socket pair); the child never returns into the caller's code."""
    import ctypes
    import os

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent.close()
            keep = child.fileno()
            for fd in os.listdir("/proc/self/fd"):  # nothing of the agent's: sockets, netlink
                if int(fd) > 2 and int(fd) != keep:
                    try:
                        os.close(int(fd))
                    except OSError:
                        pass
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            serve(child.makefile("r"), child.makefile("w"))
        except BaseException:  # noqa: BLE001 - never return into the parent's code
            code = 1
        finally:
            os._exit(code)
    child.close()
    return pid, parent


def main() -> None:
    """Standalone (``unshare --net python -m protego.gpn.canary_peer``): stdin/stdout."""
    serve(sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
