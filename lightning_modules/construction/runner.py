"""Runs one stage's requests through a backend: validate, retry invalid answers, journal the rest.

An answer that breaks the stage's schema is asked again (a new attempt, with a new sampling seed
for in-process models) up to ``attempts`` times, then journalled as a failure with its raw text.
Every answer is journalled, the retried ones too (marked ``retry``: they count in the usage, not
as the key's outcome). A transport failure (the server still down after the backend's own retries) is journalled too,
but a rerun tries it again: an outage is not the product's fault. A request the server refuses
for good (a 4xx) and an answer that stays invalid are failures that stay done unless
``retry_failed``; a 401/403/404 stops the stage at once, since every request would share it, and so
does a call in which every request found nothing listening (``EndpointUnavailable``): a rerun of
the same command cannot help until the server is there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from ..generation.chat import ChatBackend, ChatRequest, Completion, EndpointUnavailable
from .answers import InvalidAnswer
from .journal import Journal


@dataclass
class WorkItem:
    """One request to make; ``build`` reads its images only when its chunk is sent."""

    key: str
    build: Callable[[], ChatRequest]
    context: dict[str, Any] = field(default_factory=dict)


Validate = Callable[[WorkItem, str], Any]
# The server refuses every request like this one: the configuration is wrong, not the product.
CONFIG_STATUSES = {401: "check the API key (--api-key-env)", 403: "check the API key's permissions",
                   404: "check --base-url and --model"}


class ServerRefused(RuntimeError):
    pass


def final_records(journal: Journal) -> list[dict[str, Any]]:
    """Records that settle their key; ``retry`` records only log an answer that was asked again."""
    return [r for r in journal.records if not r.get("retry")]


def finished_keys(journal: Journal, retry_failed: bool = False) -> set[str]:
    return {r["key"] for r in final_records(journal) if r["ok"] or not (r.get("transport") or retry_failed)}


def run_stage(stage: str, backend: ChatBackend, items: list[WorkItem], journal: Journal, validate: Validate,
              attempts: int = 3, progress: bool = True, chunk: int = 512) -> dict[str, Any]:
    """Answers every item not already in the journal; returns this run's request statistics."""
    stats = {"requests": 0, "http_requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "retried_invalid": 0,
             "seconds": 0.0}
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc=stage, unit="req", disable=not progress, dynamic_ncols=True)
    # Chunks bound what is queued in memory; a chunk's invalid answers are retried before the next.
    for lo in range(0, len(items), chunk):
        pending = items[lo:lo + chunk]
        built = {id(item): item.build() for item in pending}
        for attempt in range(1, attempts + 1):
            if not pending:
                break
            retry: list[WorkItem] = []
            # This call's requests that found nothing listening, and those that got any answer.
            tally: dict[str, Any] = {"refused": 0, "answered": 0, "what": ""}
            requests = []
            for item in pending:
                built[id(item)].tag["attempt"] = attempt
                requests.append(built[id(item)])

            def on_result(i: int, c: Completion, pending: list[WorkItem] = pending, retry: list[WorkItem] = retry,
                          attempt: int = attempt, tally: dict[str, Any] = tally) -> None:
                item = pending[i]
                stats["requests"] += 1
                stats["http_requests"] += c.requests
                stats["prompt_tokens"] += c.prompt_tokens
                stats["completion_tokens"] += c.completion_tokens
                usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                         "http_requests": c.requests, "attempts": attempt}
                record = {"key": item.key, "model": backend.name, **item.context}
                if c.unreachable:
                    tally["refused"] += 1
                    tally["what"] = c.unreachable
                else:
                    tally["answered"] += 1
                if c.error is not None and c.status in CONFIG_STATUSES:
                    raise ServerRefused(f"stage {stage}: {c.error.splitlines()[0][:200]}; {CONFIG_STATUSES[c.status]}")
                if c.error is not None:
                    # A transport failure is asked again by the next run; any other refusal (a 400 for
                    # a prompt over the context length, an image the server rejects) is final.
                    journal.append({**record, "ok": False, "transport": c.status is None, "error": c.error, **usage})
                    bar.update()
                    return
                try:
                    value = validate(item, c.text)
                except InvalidAnswer as exc:
                    if attempt < attempts:
                        stats["retried_invalid"] += 1
                        retry.append(item)
                        # Logged, so the usage in the summary counts every answer paid for.
                        journal.append({**record, "ok": False, "retry": True, "error": str(exc), "raw": c.text,
                                        **usage})
                        return
                    journal.append({**record, "ok": False, "error": str(exc), "raw": c.text, **usage})
                    bar.update()
                    return
                journal.append({**record, "ok": True, "value": value, **usage})
                bar.update()

            try:
                backend.complete(requests, on_result)
            except BaseException:
                bar.close()  # the stage stops here: the bar's line ends before the caller's message
                raise
            if tally["refused"] and not tally["answered"]:
                bar.close()
                raise EndpointUnavailable(getattr(backend, "url", backend.name),
                                          f"{tally['what']} for every request ({tally['refused']} of them)", "connect")
            pending = retry
    bar.close()
    stats["seconds"] = round(time.perf_counter() - start, 3)
    return stats
