"""An OpenAI-compatible chat-completions client (vLLM, SGLang, ``transformers serve``, hosted APIs).

Images go inline as base64 data URLs. Many requests are in flight at once (``concurrency``); a
429, a 5xx, a timeout or a dropped connection is retried with exponential backoff and jitter
(honouring ``Retry-After``); any other 4xx is final, since resending the same body cannot help.

A connection refused is different: nothing listens at the URL, and waiting out every request's
retries against a dead server only hides that for minutes. ``check`` asks the endpoint once before
any work (``GET /models``, else a one-token chat request), and during ``complete`` refused
connections alone for ``dead_window_s`` seconds (no answer of any kind in between) stop it with
``EndpointUnavailable``; answers already given were passed to ``on_result``. The window is time, not
a count: at concurrency 8 a server restarting for two seconds refuses dozens of attempts, and must
not end a build of hours. Refused attempts are retried at most a quarter window apart, so a dead
server is called dead soon after the window ends. A request that gave up
on refused connections says so in ``Completion.unreachable``, so a caller can tell a dead server
from a request the server failed.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from .chat import ChatRequest, Completion, EndpointUnavailable, ImagePart, OnResult

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}
TAG_HEADER = "X-CIR-Tag"
# Statuses of a server that does not offer ``GET /models``: ask with a chat request instead.
NO_MODELS_LIST = {404, 405, 501}


def connect_failure(exc: aiohttp.ClientConnectorError) -> str:
    """What the socket said, in words: ``connection refused`` is the common case (no server on that port)."""
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError) or getattr(os_error, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    return f"cannot connect ({getattr(os_error, 'strerror', None) or os_error})"


def _first_line(text: str, limit: int = 160) -> str:
    lines = text.strip().splitlines()
    return lines[0][:limit] if lines else ""


def message_body(request: ChatRequest) -> list[dict[str, Any]]:
    """The request as OpenAI chat messages: text and ``image_url`` parts in their order."""
    parts: list[dict[str, Any]] = []
    for part in request.user:
        if isinstance(part, ImagePart):
            url = f"data:{part.mime};base64,{base64.b64encode(part.data).decode()}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append({"type": "text", "text": part})
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": parts})
    return messages


def answer_text(payload: dict[str, Any]) -> str:
    """The first choice's content; servers may send a string or a list of text parts."""
    content = payload["choices"][0]["message"].get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


class OpenAIChat:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout_s: float = 600.0, max_retries: int = 6, backoff_s: float = 1.0, backoff_cap_s: float = 60.0,
                 extra_body: dict[str, Any] | None = None, send_tag: bool = False,
                 dead_window_s: float = 10.0) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency}: needs at least 1 request in flight")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.name = model
        self.api_key = os.environ.get(api_key_env, "")
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.backoff_s, self.backoff_cap_s = backoff_s, backoff_cap_s
        self.extra_body = dict(extra_body or {})
        # The tag names products; only a local test server should see it, never a hosted API.
        self.send_tag = send_tag
        # How long refused connections alone (any HTTP answer resets them) mean the server is gone.
        self.dead_window_s = dead_window_s
        self._refused = 0
        self._refused_since = 0.0

    def check(self, timeout_s: float = 30.0) -> None:
        """One request that proves the endpoint serves ``model``, or ``EndpointUnavailable`` naming
        the URL and what answered. ``GET /models`` where offered; a server that lists other models
        may still accept an alias (Ollama's ``name`` for ``name:latest``), so a chat request decides."""
        asyncio.run(self._check(timeout_s))

    async def _check(self, timeout_s: float) -> None:
        headers = self._headers(None)
        models_url = self.base_url + "/models"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            listed: list[str] | None = None
            status, text, payload = await self._probe(session.get(models_url, headers=headers), models_url, timeout_s)
            if status == 200 and isinstance(payload, dict) and isinstance(payload.get("data"), list):
                listed = [str(m.get("id")) for m in payload["data"] if isinstance(m, dict)]
                if self.model in listed:
                    return
            elif status not in NO_MODELS_LIST and status != 200:
                raise EndpointUnavailable(models_url, f"answered HTTP {status} {_first_line(text)}".rstrip(),
                                          "status", status)
            body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "ping"}],
                               "max_tokens": 1, "stream": False}).encode()
            status, text, _ = await self._probe(session.post(self.url, data=body, headers=headers), self.url,
                                                timeout_s)
            # 429: the server is there and knows the key, it is only busy.
            if status in (200, 429):
                return
            if listed is not None:
                shown = ", ".join(listed[:5]) + (f" and {len(listed) - 5} more" if len(listed) > 5 else "")
                raise EndpointUnavailable(models_url, f"does not list model {self.model!r} (it serves "
                                          f"{shown or 'no model'}), and a request for it answered HTTP {status}",
                                          "model", status)
            raise EndpointUnavailable(self.url, f"answered HTTP {status} {_first_line(text)}".rstrip(), "status",
                                      status)

    @staticmethod
    async def _probe(pending: Any, url: str, timeout_s: float) -> tuple[int, str, Any]:
        """(status, body text, JSON body or None) of one request, or ``EndpointUnavailable`` when none came."""
        try:
            async with pending as resp:
                text = await resp.text()
        except aiohttp.ClientConnectorError as exc:
            raise EndpointUnavailable(url, connect_failure(exc), "connect") from exc
        except TimeoutError as exc:
            raise EndpointUnavailable(url, f"no answer within {timeout_s:g} s", "timeout") from exc
        except aiohttp.ClientError as exc:
            raise EndpointUnavailable(url, f"no answer ({type(exc).__name__}: {_first_line(str(exc))})",
                                      "connect") from exc
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            payload = None
        return resp.status, text, payload

    def _body(self, request: ChatRequest) -> bytes:
        body = {"model": self.model, "messages": message_body(request), "max_tokens": request.max_tokens,
                "temperature": request.temperature, "stream": False, **self.extra_body}
        return json.dumps(body).encode()

    def _headers(self, request: ChatRequest | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.send_tag and request is not None:
            headers[TAG_HEADER] = json.dumps(request.tag)
        return headers

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.backoff_cap_s, float(retry_after))
            except ValueError:
                pass
        return min(self.backoff_cap_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    async def _one(self, session: aiohttp.ClientSession, request: ChatRequest) -> Completion:
        body, headers = self._body(request), self._headers(request)
        error = ""
        for attempt in range(self.max_retries + 1):
            retry_after, unreachable = None, None
            try:
                async with session.post(self.url, data=body, headers=headers) as resp:
                    self._refused = 0  # someone listens, whatever it answers
                    if resp.status == 200:
                        payload = await resp.json(content_type=None)
                        usage = payload.get("usage") or {}
                        return Completion(answer_text(payload), int(usage.get("prompt_tokens") or 0),
                                          int(usage.get("completion_tokens") or 0), requests=attempt + 1)
                    text = (await resp.text())[:300]
                    error = f"HTTP {resp.status}: {text}"
                    if resp.status not in RETRYABLE:
                        return Completion(error=error, requests=attempt + 1, status=resp.status)
                    retry_after = resp.headers.get("Retry-After")
            except aiohttp.ClientConnectorError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
                unreachable = connect_failure(exc)
                self._note_refused(unreachable)
            except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, KeyError, IndexError, AttributeError,
                    TypeError) as exc:
                self._refused = 0  # a timeout or a dropped connection: not a refusal, whatever the cause
                error = f"{type(exc).__name__}: {exc}"[:300]
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                await asyncio.sleep(min(delay, self.dead_window_s / 4) if unreachable else delay)
        return Completion(error=f"gave up after {self.max_retries + 1} attempts: {error}",
                          requests=self.max_retries + 1, unreachable=unreachable)

    def _note_refused(self, what: str) -> None:
        """Counts a refused connection; stops the call once refusals alone fill the window."""
        now = time.monotonic()
        if not self._refused:
            self._refused_since = now
        self._refused += 1
        span = now - self._refused_since
        if self._refused >= 2 and span >= self.dead_window_s:
            raise EndpointUnavailable(self.url, f"{what} for every request over {span:.0f} s "
                                      f"({self._refused} attempts in a row)", "connect")

    async def _run(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        connector = aiohttp.TCPConnector(limit=self.concurrency)

        async with aiohttp.ClientSession(connector=connector, timeout=self.timeout) as session:
            async def task(i: int) -> None:
                async with gate:
                    result = await self._one(session, requests[i])
                on_result(i, result)

            tasks = [asyncio.create_task(task(i)) for i in range(len(requests))]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                # One failure stops the call (a dead server, or the caller's on_result refusing):
                # the other requests are cancelled here, not left to fail against a closed session.
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    def complete(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        if requests:
            self._refused = 0
            asyncio.run(self._run(requests, on_result))

    def close(self) -> None:
        pass
