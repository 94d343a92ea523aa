"""Picking a TCP port for a private system (tests, benchmarks) that nothing else takes before it is bound."""

from __future__ import annotations

import random
import socket

# Below the kernel's ephemeral range (32768-60999 by default) and above Ray's worker ports (10002-19999). A port the
# kernel hands out (bind to port 0) lies in the ephemeral range, where any outgoing connection (Ray's processes make
# many) may take it before the server meant for it binds: CI once failed on "Failed to bind to address".
LOW, HIGH = 20_000, 32_000
_given: set[int] = set()  # never the same port twice to one process, even before the first is bound


def free_port() -> int:
    for _ in range(1000):
        port = random.randint(LOW, HIGH)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port between {LOW} and {HIGH}")
