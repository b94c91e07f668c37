"""Waiting for a server a test started: its ``/health`` answering 200, or a clear failure."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .ports import free_port


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


@contextlib.contextmanager
def in_process_server(engine: Any, **options: Any) -> Iterator[str]:
    """The same app as `cir serve`, on a localhost port, in a thread of this process."""
    import uvicorn

    from cir.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, **options), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, limit_s=60)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
