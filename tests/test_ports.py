"""Ports for private systems: never one the kernel may hand to an outgoing connection meanwhile."""

from __future__ import annotations

import socket

from cluster.ports import HIGH, LOW, free_port


def test_ports_lie_outside_the_ephemeral_range_are_free_and_never_repeat() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(LOW <= p <= HIGH < ephemeral_low for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # free indeed
