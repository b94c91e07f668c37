"""Waiting for a server a test started: its ``/health`` answering 200, or a clear failure."""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def wait_healthy(url: str, proc: subprocess.Popen | None = None, log: Path | None = None, limit_s: float = 180,
                 name: str = "cir serve") -> None:
    """Returns once ``{url}/health`` answers 200; fails the test when ``proc`` exits first (with the
    end of ``log``) or after ``limit_s`` seconds."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:] if log else ''}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            if r.status == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"{name} did not answer /health within {limit_s} s")
