"""The HTTP backend against a real local server loop: the OpenAI wire format both ways, retries on
429/503, final errors on other 4xx and on a dead port."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

import pytest
from PIL import Image

from lightning_modules.generation import ChatRequest, Completion, OpenAIChat, encode_image
from lightning_modules.generation.chat import OnResult
from lightning_modules.generation.local_server import serve_backend


class Echo:
    """Records what reached the server; answers with a summary of it."""

    name = "echo"

    def __init__(self) -> None:
        self.seen: list[ChatRequest] = []

    def complete(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        for i, r in enumerate(requests):
            self.seen.append(r)
            texts = [p for p in r.user if isinstance(p, str)]
            on_result(i, Completion(f"{r.system}|{'/'.join(texts)}|{len(r.images)}", prompt_tokens=7,
                                    completion_tokens=5))

    def close(self) -> None:
        pass


def _collect(backend: OpenAIChat, requests: list[ChatRequest]) -> dict[int, Completion]:
    out: dict[int, Completion] = {}
    backend.complete(requests, lambda i, c: out.__setitem__(i, c))
    return out


def test_wire_format_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    image = encode_image(Image.new("RGB", (20, 10), (1, 2, 3)))
    echo = Echo()
    with serve_backend(echo) as (url, _):
        client = OpenAIChat(url, "m", concurrency=4)
        req = ChatRequest(user=["[Image 1]", image, "describe"], system="be brief", max_tokens=33, temperature=0.7,
                          tag={"stage": "captions", "products": ["p/1"]})
        got = _collect(client, [req])[0]
    assert got.text == "be brief|[Image 1]/describe|1" and (got.prompt_tokens, got.completion_tokens) == (7, 5)
    seen = echo.seen[0]
    assert seen.images[0].data == image.data and seen.images[0].mime == "image/jpeg"  # base64 both ways, intact
    assert [p for p in seen.user if isinstance(p, str)] == ["[Image 1]", "describe"]
    assert (seen.max_tokens, seen.temperature) == (33, 0.7)
    assert seen.tag == {}  # product ids never leave the machine unless asked for (send_tag)


def test_retries_on_429_and_503_until_every_request_is_answered() -> None:
    with serve_backend(Echo(), refuse_every=3) as (url, app):
        client = OpenAIChat(url, "m", concurrency=8, backoff_s=0.01, max_retries=6)
        got = _collect(client, [ChatRequest(user=[f"q{i}"]) for i in range(30)])
    assert sorted(got) == list(range(30)) and all(c.error is None for c in got.values())
    assert all(got[i].text == f"None|q{i}|0" for i in range(30))
    assert app.refused > 0 and sum(c.requests for c in got.values()) == 30 + app.refused


def test_a_client_error_is_final_and_a_dead_port_gives_up() -> None:
    with serve_backend(Echo()) as (url, _):
        client = OpenAIChat(url, "m", extra_body={"messages": "not a list"}, max_retries=3, backoff_s=0.01)
        got = _collect(client, [ChatRequest(user=["x"])])[0]
    assert got.error is not None and got.error.startswith("HTTP 400") and got.requests == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_s=0.01, timeout_s=5)
    got = _collect(dead, [ChatRequest(user=["x"])])[0]
    assert got.error is not None and "gave up after 3 attempts" in got.error and got.requests == 3


class SlowOnce(Echo):
    """Answers its first request after longer than the client waits."""

    def complete(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        if not self.seen:
            time.sleep(1.0)
        super().complete(requests, on_result)


def test_a_timed_out_request_is_sent_again() -> None:
    slow = SlowOnce()
    with serve_backend(slow) as (url, _):
        client = OpenAIChat(url, "m", timeout_s=0.4, backoff_s=0.01, max_retries=3)
        got = _collect(client, [ChatRequest(user=["late"])])[0]
    # The server loop is blocked while it sleeps, so a retry may time out too before one is answered.
    assert got.error is None and got.text == "None|late|0" and got.requests >= 2 and len(slow.seen) == got.requests
