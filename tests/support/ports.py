"""Free localhost ports for rendezvous and test servers that two pytest-xdist workers cannot both pick.

A port the OS hands out for ``bind(0)`` comes from the ephemeral range, the same range every outgoing
connection (gloo's many peer sockets included) draws from: between "found free" and "listening" another
process may take it (CI saw ``EADDRINUSE`` on a DDP rendezvous). Ports here come from below that range, and
each xdist worker draws from its own slice, so only a foreign listener could collide, and then we move on.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_LOW, _HIGH = 20000, 32000  # below Linux's default ephemeral range (32768-60999)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _slice() -> range:
    high = min(_HIGH, _ephemeral_start())
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = (high - _LOW) // max(count, 1)
    return range(_LOW + index * width, _LOW + (index + 1) * width)


def free_port() -> int:
    """A port nobody listens on now, from this test worker's own slice below the ephemeral range."""
    candidates = _slice()
    for _ in range(200):
        port = random.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {candidates.start}-{candidates.stop - 1}")
