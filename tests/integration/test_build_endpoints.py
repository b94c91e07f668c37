"""`cir build --backend openai` (and `cir caption --base-url`) against endpoints that cannot serve
it: nothing listening, a server that does not list the model, one that answers 500, and one that
dies after the check. Each stops in seconds with one line naming the URL, what answered and the
option to fix. A server that is down for a moment only (a restart) is waited for."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.ports import free_port

from cir.build import main as cir_build
from cir.caption import main as cir_caption
from datamodules.synthetic import generate
from datamodules.synthetic.catalogue import write_catalogue_layout
from lightning_modules.generation import ChatRequest, EndpointUnavailable, OpenAIChat

OPTIONS = ["--backend", "openai", "--image-encoder", "clip:tiny", "--composite-height", "96", "--no-progress"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("endpoint-catalogue")
    write_catalogue_layout(root, generate(10, seed=2), seed=2, accessories=0)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("caption-shards")
    write_synthetic(out, products=40, seed=0)
    return out


@contextmanager
def http_server(handle: Callable[[BaseHTTPRequestHandler], None], requests: int | None = None) -> Iterator[str]:
    """A stdlib server on a thread; ``requests`` set: it closes its socket after that many (a server
    that dies mid-build). Yields the base URL, ``.../v1``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            handle(self)

        def do_POST(self) -> None:  # noqa: N802
            handle(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    if requests is None:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
    else:
        def serve_then_close() -> None:
            for _ in range(requests):
                server.handle_request()
            server.server_close()
        thread = threading.Thread(target=serve_then_close, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        if requests is None:
            server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def reply(h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def lists_other_models(h: BaseHTTPRequestHandler) -> None:
    if h.command == "GET" and h.path == "/v1/models":
        reply(h, 200, {"object": "list", "data": [{"id": "served-a", "object": "model"},
                                                  {"id": "served-b", "object": "model"}]})
    else:  # as vLLM answers a model it does not serve
        reply(h, 404, {"error": {"message": "The model `x` does not exist."}})


def fails(h: BaseHTTPRequestHandler) -> None:
    reply(h, 500, {"error": {"message": "CUDA out of memory"}})


def serves_x(h: BaseHTTPRequestHandler) -> None:
    reply(h, 200, {"object": "list", "data": [{"id": "x", "object": "model"}]})


def run_build(argv: list[str]) -> tuple[str, float]:
    """(the message cir build stopped with, seconds it took)."""
    start = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        cir_build(argv)
    message = stopped.value.code
    assert isinstance(message, str), f"exited {message!r} without a message"
    return message, time.monotonic() - start


def check_message(message: str, url: str, *words: str) -> None:
    lines = message.strip().splitlines()
    assert 1 <= len(lines) <= 3, message
    assert url in message, message
    for word in words:
        assert word in message, message


def test_nothing_listening_stops_before_any_work(catalogue: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    url = f"http://127.0.0.1:{free_port()}/v1"
    message, seconds = run_build(["--catalogue", str(catalogue), "--out", str(tmp_path / "out"), *OPTIONS,
                                  "--base-url", url, "--model", "x"])
    check_message(message, url, "connection refused", "--base-url")
    assert seconds < 10
    assert not (tmp_path / "out" / "build" / "captions.jsonl").exists()  # no request was made


def test_a_stage_endpoint_names_its_own_option(catalogue: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with http_server(serves_x) as url:
        message, seconds = run_build(["--catalogue", str(catalogue), "--out", str(tmp_path / "out"), *OPTIONS,
                                      "--base-url", url, "--model", "x", "--triplets-base-url", dead])
    check_message(message, dead, "connection refused", "--triplets-base-url")
    assert seconds < 10


def test_a_server_without_the_model_is_named_with_what_it_serves(catalogue: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    with http_server(lists_other_models) as url:
        message, seconds = run_build(["--catalogue", str(catalogue), "--out", str(tmp_path / "out"), *OPTIONS,
                                      "--base-url", url, "--model", "x"])
    check_message(message, f"{url}/models", "'x'", "served-a", "--model")
    assert seconds < 10


def test_a_failing_server_is_named_with_its_status(catalogue: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    with http_server(fails) as url:
        message, seconds = run_build(["--catalogue", str(catalogue), "--out", str(tmp_path / "out"), *OPTIONS,
                                      "--base-url", url, "--model", "x"])
    check_message(message, url, "HTTP 500", "--base-url")
    assert seconds < 10


@pytest.mark.parametrize("retries", ["0", "6"])
def test_a_server_gone_after_the_check_stops_the_build_in_seconds(catalogue: Path, tmp_path: Path, retries: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The server answers the check, then closes: every request of the build finds nothing listening.
    # Before, each one retried to its end (minutes), or with --max-retries 0 the build said to rerun.
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    with http_server(serves_x, requests=1) as url:
        message, seconds = run_build(["--catalogue", str(catalogue), "--out", str(tmp_path / "out"), *OPTIONS,
                                      "--base-url", url, "--model", "x", "--max-retries", retries])
    check_message(message, url, "connection refused", "--base-url")
    assert seconds < 20


def test_the_client_gives_up_on_a_dead_server_within_its_window() -> None:
    # The default backoff (1 s doubling, 6 retries) would take a minute per request.
    client = OpenAIChat(f"http://127.0.0.1:{free_port()}/v1", "m", concurrency=2, dead_window_s=2.0)
    start = time.monotonic()
    with pytest.raises(EndpointUnavailable, match="connection refused for every request") as stopped:
        client.complete([ChatRequest(user=[f"q{i}"]) for i in range(4)], lambda i, c: None)
    assert stopped.value.kind == "connect" and time.monotonic() - start < 8


def test_a_server_down_for_two_seconds_is_waited_for_not_called_dead() -> None:
    # Before, 16 refused attempts in a row stopped the call: at concurrency 8 they took about 1 s.
    port = free_port()
    client = OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", concurrency=8)
    answered: dict[int, str | None] = {}

    def chat(h: BaseHTTPRequestHandler) -> None:
        reply(h, 200, {"choices": [{"message": {"role": "assistant", "content": "ok"}}]})

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            chat(self)

        def log_message(self, *args: object) -> None:
            pass

    servers: list[ThreadingHTTPServer] = []

    def come_back() -> None:
        time.sleep(2.0)
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), Handler))
        servers[0].serve_forever()

    thread = threading.Thread(target=come_back, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        client.complete([ChatRequest(user=[f"q{i}"]) for i in range(16)],
                        lambda i, c: answered.__setitem__(i, c.text if c.error is None else None))
    finally:
        while not servers and thread.is_alive():
            time.sleep(0.05)
        if servers:
            servers[0].shutdown()
            servers[0].server_close()
    assert answered == dict.fromkeys(range(16), "ok")
    assert time.monotonic() - start < client.dead_window_s  # it did not wait out the window either


def test_caption_against_nothing_listening_is_one_line_before_any_work(tmp_path: Path, shards: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    url = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "captions.jsonl"
    start = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        cir_caption(["--data", str(shards), "--out", str(out), "--base-url", url, "--name-or-path", "x"])
    message = str(stopped.value.code)
    check_message(message, f"{url}/models", "connection refused", "--base-url")
    assert message.startswith("cir caption: ") and "rerun" not in message
    assert time.monotonic() - start < 10 and not out.exists()


def test_caption_against_a_server_gone_after_the_check_says_to_rerun(tmp_path: Path, shards: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    start = time.monotonic()
    with http_server(serves_x, requests=1) as url, pytest.raises(SystemExit) as stopped:
        cir_caption(["--data", str(shards), "--out", str(tmp_path / "c.jsonl"), "--base-url", url,
                     "--name-or-path", "x"])
    message = str(stopped.value.code)
    check_message(message, url, "connection refused", "--base-url", "captions so far are kept")
    assert time.monotonic() - start < 30  # the 10 s window, then retries at most 2.5 s apart


def test_caption_mistakes_are_one_line(tmp_path: Path, shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    out = str(tmp_path / "c.jsonl")
    cases = [
        (["--data", str(shards), "--captioner", "oracle", "--base-url", "http://127.0.0.1:9/v1"],
         ["--base-url", "oracle", "asks no server"]),
        (["--data", str(shards), "--captioner", "oracle", "--splits", "nosuch"],
         ["no split 'nosuch'", "'train'", "'val'"]),
    ]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("[1, 2]")
    cases.append((["--data", str(broken), "--captioner", "oracle"], [str(broken / "manifest.json"), "not an object"]))
    for argv, words in cases:
        with pytest.raises(SystemExit) as stopped:
            cir_caption([*argv, "--out", out])
        message = str(stopped.value.code)
        assert message.startswith("cir caption: ") and len(message.splitlines()) == 1, message
        assert all(w in message for w in words), message
        assert not message.startswith("cir caption: \"")  # a KeyError's quotes are not shown


def test_caption_of_a_folder_that_is_no_shard_folder_is_one_line(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stopped:
        cir_caption(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "c.jsonl"), "--captioner", "oracle"])
    assert str(stopped.value.code) == (f"cir caption: --data {tmp_path / 'nope'}: not a shard folder (no "
                                       "manifest.json); make one with cir data")


def test_a_server_without_a_models_list_is_checked_with_one_tiny_chat_request() -> None:
    seen: list[tuple[str, str, dict]] = []

    def chat_only(h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length") or 0)) or b"{}")
        seen.append((h.command, h.path, body))
        if h.command == "POST" and h.path == "/v1/chat/completions":
            reply(h, 200, {"choices": [{"message": {"role": "assistant", "content": "p"}}]})
        else:
            reply(h, 404, {"detail": "Not Found"})

    with http_server(chat_only) as url:
        OpenAIChat(url, "x").check(timeout_s=5)
    assert [(m, p) for m, p, _ in seen] == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
    assert seen[1][2]["model"] == "x" and seen[1][2]["max_tokens"] == 1
