"""Classic BPF programs that shard ESP across the workers by SPI.

* :func:`reuseport_by_spi` -- for the ``SO_REUSEPORT`` group of UDP 4500 sockets
  (``SO_ATTACH_REUSEPORT_CBPF``): the program sees the UDP payload, loads the SPI
  (its first 4 bytes) and returns ``SPI mod workers``, the index of the socket in
  the group (sockets join in worker order). An inbound SA therefore lives in
  exactly one worker: its replay window needs no lock. IKE (zero marker) and NAT
  keepalives land on worker 0, which ignores them.
* :func:`raw_esp_owner` -- a socket filter for each worker's raw protocol-50
  socket (every raw socket gets a copy of each packet): accept only the SPIs
  ``SPI mod workers == worker``.

Programs are lists of ``(code, jt, jf, k)``; :func:`pack` builds the
``struct sock_filter`` array; :func:`attach` does the one ``setsockopt``.
"""

from __future__ import annotations

import ctypes
import socket
import struct

__all__ = ["SO_ATTACH_FILTER", "SO_ATTACH_REUSEPORT_CBPF", "attach", "pack", "raw_esp_owner",
           "reuseport_by_spi", "run", "tagged_only"]

SO_ATTACH_FILTER = 26
SO_ATTACH_REUSEPORT_CBPF = 51

# opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_LD_B_ABS = 0x30
_LD_W_IND = 0x40
_LD_H_IND = 0x48
_ALU_AND_K = 0x54
_LDX_B_MSH = 0xB1
_ALU_MOD_K = 0x94
_JEQ_K = 0x15
_RET_K = 0x06
_RET_A = 0x16

Insn = tuple[int, int, int, int]


def reuseport_by_spi(workers: int) -> list[Insn]:
    return [(_LD_W_ABS, 0, 0, 0), (_ALU_MOD_K, 0, 0, workers), (_RET_A, 0, 0, 0)]


def raw_esp_owner(workers: int, worker: int) -> list[Insn]:
    return [
        (_LDX_B_MSH, 0, 0, 0),  # X = IPv4 header length
        (_LD_W_IND, 0, 0, 0),  # A = SPI
        (_ALU_MOD_K, 0, 0, workers),
        (_JEQ_K, 0, 1, worker),
        (_RET_K, 0, 0, 0x40000),  # accept the whole packet
        (_RET_K, 0, 0, 0),  # not ours
    ]


def tagged_only(dscp: int, udp_ports: tuple[int, ...] = ()) -> list[Insn]:
    """A socket filter for a raw IPv4 socket that keeps only packets whose outer DSCP is
    ``dscp`` (the GIN/GEN's heartbeat tag) and, with ``udp_ports``, whose UDP destination
    port is one of them. The xfrm backend's heartbeat server sees the tagged packets the
    kernel decapsulates, and the kernel drops every other copy before it is queued."""
    prog: list[Insn] = [
        (_LD_B_ABS, 0, 0, 1),  # A = TOS
        (_ALU_AND_K, 0, 0, 0xFC),
        (_JEQ_K, 1, 0, dscp << 2),
        (_RET_K, 0, 0, 0),
    ]
    if udp_ports:
        prog.append((_LDX_B_MSH, 0, 0, 0))  # X = IPv4 header length
        prog.append((_LD_H_IND, 0, 0, 2))  # A = UDP destination port
        n = len(udp_ports)
        for i, port in enumerate(udp_ports):  # a match jumps over the other tests and the drop
            prog.append((_JEQ_K, n - i, 0, port))
        prog.append((_RET_K, 0, 0, 0))
    prog.append((_RET_K, 0, 0, 0x40000))
    return prog


def pack(prog: list[Insn]) -> bytes:
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def attach(sock: socket.socket, option: int, prog: list[Insn]) -> None:
    buf = ctypes.create_string_buffer(pack(prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, option, fprog)


def run(prog: list[Insn], data: bytes) -> int:
    """A tiny interpreter for the opcodes above (for unit tests without sockets).
    Out-of-bounds loads end the program with 0, as the kernel does."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code in (_LD_W_ABS, _LD_W_IND, _LD_H_IND, _LD_B_ABS):
            off = k + (x if code in (_LD_W_IND, _LD_H_IND) else 0)
            size = 4 if code in (_LD_W_ABS, _LD_W_IND) else 2 if code == _LD_H_IND else 1
            if off + size > len(data):
                return 0
            a = int.from_bytes(data[off:off + size], "big")
        elif code == _ALU_AND_K:
            a &= k
        elif code == _LDX_B_MSH:
            if k >= len(data):
                return 0
            x = (data[k] & 0x0F) * 4
        elif code == _ALU_MOD_K:
            a %= k
        elif code == _JEQ_K:
            pc += jt if a == k else jf
        elif code == _RET_K:
            return k
        elif code == _RET_A:
            return a
        else:
            raise ValueError(f"opcode {code:#x} not supported")
