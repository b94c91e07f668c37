"""A minimal OpenAI-compatible chat-completions server in front of any ``ChatBackend``.

It exists so the HTTP client is tested against a real socket and a real server loop (the same wire
format vLLM and ``transformers serve`` speak) when no real model server can run, e.g. fed by the
oracle on a CPU machine, and so the client's own overhead can be measured against an instant
server. ``refuse_every=n`` answers every n-th request with a 429 or a 503, to exercise retries.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from .chat import ChatBackend, ChatRequest, Completion, ImagePart
from .openai_http import TAG_HEADER


def request_from_body(body: dict[str, Any], tag: dict[str, Any]) -> ChatRequest:
    system, parts = None, []
    for message in body["messages"]:
        content = message["content"]
        if message["role"] == "system":
            system = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
            continue
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part["type"] == "text":
                parts.append(part["text"])
            elif part["type"] == "image_url":
                header, _, data = part["image_url"]["url"].partition(",")
                if not header.startswith("data:") or ";base64" not in header:
                    raise ValueError("only base64 data URLs are accepted")
                parts.append(ImagePart(base64.b64decode(data), header[5:].split(";")[0]))
    return ChatRequest(user=parts, system=system, max_tokens=int(body.get("max_tokens") or 1024),
                       temperature=float(body.get("temperature") or 0.0), tag=tag)


class _App:
    def __init__(self, backend: ChatBackend, refuse_every: int) -> None:
        self.backend, self.refuse_every = backend, refuse_every
        self.served = 0
        self.refused = 0
        self._seen = 0

    async def chat(self, http: web.Request) -> web.Response:
        self._seen += 1
        if self.refuse_every and self._seen % self.refuse_every == 0:
            self.refused += 1
            status = 429 if self.refused % 2 else 503
            return web.json_response({"error": {"message": "try again"}}, status=status,
                                     headers={"Retry-After": "0"} if status == 429 else None)
        try:
            body = await http.json()
            tag = json.loads(http.headers.get(TAG_HEADER, "{}"))
            request = request_from_body(body, tag)
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": {"message": f"bad request: {exc}"}}, status=400)
        answers: list[Completion] = []
        self.backend.complete([request], lambda _, c: answers.append(c))
        answer = answers[0]
        self.served += 1
        return web.json_response({
            "id": f"chatcmpl-{self.served}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.backend.name),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens}})

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


@contextmanager
def serve_backend(backend: ChatBackend, host: str = "127.0.0.1", port: int = 0,
                  refuse_every: int = 0) -> Iterator[tuple[str, _App]]:
    """Run the server on a background thread; yields (``base_url`` ending in ``/v1``, the app)."""
    app_state = _App(backend, refuse_every)
    app = web.Application(client_max_size=256 * 2**20)
    app.router.add_post("/v1/chat/completions", app_state.chat)
    app.router.add_get("/health", app_state.health)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, host, port)
    loop.run_until_complete(site.start())
    bound = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{bound}/v1", app_state
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
