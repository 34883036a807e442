"""The BPF programs that shard ESP across workers by SPI."""

from __future__ import annotations

import socket
import struct
import time

from protego.esp.framing import build_ipv4_header
from protego.gpn import bpf


def test_reuseport_program_returns_spi_mod_workers() -> None:
    prog = bpf.reuseport_by_spi(3)
    for spi in (0x100, 0xC0001234, 0xFFFFFFFF):
        assert bpf.run(prog, struct.pack("!II", spi, 1) + bytes(32)) == spi % 3
    assert bpf.run(prog, b"\xff") == 0  # NAT keepalive: load out of bounds -> worker 0
    assert bpf.run(prog, bytes(8)) == 0  # IKE (zero marker) -> worker 0


def test_raw_filter_accepts_only_own_spis() -> None:
    for ihl_extra in (0, 8):
        hdr = bytearray(build_ipv4_header("198.18.1.1", "203.0.113.11", 50, 40))
        if ihl_extra:
            hdr[0] = 0x45 + ihl_extra // 4
            hdr += bytes(ihl_extra)
        for spi in (0x1000, 0x1001, 0xC0000003):
            pkt = bytes(hdr) + struct.pack("!II", spi, 7) + bytes(32)
            owners = [w for w in range(2) if bpf.run(bpf.raw_esp_owner(2, w), pkt)]
            assert owners == [spi % 2]


def test_packed_layout() -> None:
    assert len(bpf.pack(bpf.raw_esp_owner(2, 1))) == 6 * 8


def test_kernel_steers_by_spi_in_a_reuseport_group() -> None:
    """Real sockets on loopback (no root): the kernel accepts the program and
    every datagram lands on socket SPI mod 2."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    a.bind(("127.0.0.1", 0))
    port = a.getsockname()[1]
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    b.bind(("127.0.0.1", port))
    bpf.attach(a, bpf.SO_ATTACH_REUSEPORT_CBPF, bpf.reuseport_by_spi(2))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spis = list(range(0x1000, 0x1020))
    for spi in spis:
        tx.sendto(struct.pack("!II", spi, 1) + bytes(24), ("127.0.0.1", port))
    time.sleep(0.1)
    got: dict[int, list[int]] = {0: [], 1: []}
    for i, s in enumerate((a, b)):
        s.setblocking(False)
        while True:
            try:
                got[i].append(struct.unpack_from("!I", s.recv(100))[0])
            except BlockingIOError:
                break
    assert sorted(got[0]) == [x for x in spis if x % 2 == 0]
    assert sorted(got[1]) == [x for x in spis if x % 2 == 1]
    for s in (a, b, tx):
        s.close()
