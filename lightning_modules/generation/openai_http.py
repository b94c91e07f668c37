"""An OpenAI-compatible chat-completions client (vLLM, SGLang, ``transformers serve``, hosted APIs).

Images go inline as base64 data URLs. Many requests are in flight at once (``concurrency``); a
429, a 5xx, a timeout or a dropped connection is retried with exponential backoff and jitter
(honouring ``Retry-After``); any other 4xx is final, since resending the same body cannot help.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
from collections.abc import Sequence
from typing import Any

import aiohttp

from .chat import ChatRequest, Completion, ImagePart, OnResult

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}
TAG_HEADER = "X-CIR-Tag"


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
                 extra_body: dict[str, Any] | None = None, send_tag: bool = False) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency}: needs at least 1 request in flight")
        self.url = base_url.rstrip("/") + "/chat/completions"
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

    def _body(self, request: ChatRequest) -> bytes:
        body = {"model": self.model, "messages": message_body(request), "max_tokens": request.max_tokens,
                "temperature": request.temperature, "stream": False, **self.extra_body}
        return json.dumps(body).encode()

    def _headers(self, request: ChatRequest) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.send_tag:
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
            retry_after = None
            try:
                async with session.post(self.url, data=body, headers=headers) as resp:
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
            except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, KeyError, IndexError, AttributeError,
                    TypeError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            if attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        return Completion(error=f"gave up after {self.max_retries + 1} attempts: {error}",
                          requests=self.max_retries + 1)

    async def _run(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        connector = aiohttp.TCPConnector(limit=self.concurrency)

        async with aiohttp.ClientSession(connector=connector, timeout=self.timeout) as session:
            async def task(i: int) -> None:
                async with gate:
                    result = await self._one(session, requests[i])
                on_result(i, result)

            await asyncio.gather(*(task(i) for i in range(len(requests))))

    def complete(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        if requests:
            asyncio.run(self._run(requests, on_result))

    def close(self) -> None:
        pass
