"""``cir build``: catalogue → captions (stage 1) → left/right filter (stage 2) → triplets (stage 3),
as the FashionMV paper's section 3 and appendix A, resumable at every request.

Each stage journals one line per request under ``OUT/build/`` as answers return; a rerun skips
what is journalled. A stage starts only when the one before it has an answer for every product
(a request that never reached the server stops the build with a message to rerun), so a resumed
build sees the same inputs at every stage as an uninterrupted one. The release files and the
summary are rewritten from the journals at the end.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.catalogue import SPLITS, Catalogue, assign_splits, read_catalogue
from datamodules.converters.release_sessions import chain_release, remove_release_sessions

from ..generation.chat import ChatBackend, ChatRequest
from .answers import WordRanges, check_captions, check_selections, check_verification
from .candidates import candidate_pools, sample_candidates
from .embedders import build_encoders
from .journal import Journal, read_journal
from .prompts import PAPER_MAX_TOKENS, STAGES, Prompt, Stage, load_prompts
from .release import write_atomic, write_release
from .requests import Composites, caption_turn, triplet_turn, verify_turn
from .runner import WorkItem, final_records, finished_keys, run_stage


class BuildIncomplete(RuntimeError):
    pass


@dataclass
class BuildConfig:
    catalogue: Path
    out: Path
    prompts: str | None = None
    val_fraction: float = 0.15
    seed: int = 0
    neighbours: int = 20
    candidates: int = 10
    selections: int = 2
    verify_batch: int = 5
    attempts: int = 3
    composite_height: int = 512
    max_side: int = 1024
    image_encoder: str = "clip:clip-vit-b32"
    text_encoder: str = "tfidf"
    device: str | None = None
    default_dataset: str = "catalogue"
    temperature: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 1.0))
    max_tokens: dict[str, int] = field(default_factory=lambda: dict(PAPER_MAX_TOKENS))
    ranges: WordRanges = field(default_factory=WordRanges)
    retry_failed: bool = False
    progress: bool = True
    # Multi-turn sessions chained from the released triplets ({split}_sessions.jsonl): turns per session.
    chain: tuple[int, int] | None = None


def _latest(journal: Journal) -> dict[str, dict[str, Any]]:
    """The last settling record per key: a transport failure later answered counts as answered."""
    return {r["key"]: r for r in final_records(journal)}


def _usage(journal: list[dict[str, Any]]) -> dict[str, Any]:
    """What a stage paid for over every run, from its journal (only requests lost in flight escape)."""
    records = [r for r in journal if not r.get("no_candidates")]
    return {"answers": len(records), "http_requests": sum(r.get("http_requests", 0) for r in records),
            "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in records),
            "completion_tokens": sum(r.get("completion_tokens", 0) for r in records),
            "invalid_answers": sum(1 for r in records if not r["ok"] and not r.get("transport")),
            "transport_failures": sum(1 for r in records if r.get("transport")),
            "answers_by_model": dict(Counter(r["model"] for r in records if "model" in r))}


class Build:
    def __init__(self, config: BuildConfig, backend_for: Callable[[Stage], ChatBackend]) -> None:
        self.cfg = config
        self.backend_for = backend_for
        self.prompts: dict[Stage, Prompt] = load_prompts(config.prompts)
        self.work = config.out / "build"
        self.work.mkdir(parents=True, exist_ok=True)
        self.catalogue: Catalogue = read_catalogue(config.catalogue, config.default_dataset)
        self.products = self.catalogue.by_id()
        self.split_of = assign_splits(self.catalogue.products, config.val_fraction, config.seed)
        self.composites = Composites(config.composite_height)
        self.records: dict[Stage, list[dict[str, Any]]] = {}
        self._check_settings()

    def _check_settings(self) -> None:
        """A rerun must continue the same build: the first run fixes every setting that shapes the
        requests or decides which products they are about. Models may change (a resumed build on
        another server)."""
        cfg = self.cfg
        fixed = {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "neighbours": cfg.neighbours,
                 "candidates": cfg.candidates, "selections": cfg.selections, "verify_batch": cfg.verify_batch,
                 "image_encoder": cfg.image_encoder, "text_encoder": cfg.text_encoder,
                 "composite_height": cfg.composite_height, "max_side": cfg.max_side,
                 "default_dataset": cfg.default_dataset, "ranges": asdict(cfg.ranges),
                 "prompts": {s: p.sha256 for s, p in self.prompts.items()},
                 # Products, views and sizes: a catalogue that changed under a build would shift splits.
                 "catalogue": self._fingerprint()}
        path = self.work / "settings.json"
        if path.is_file():
            try:
                before = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc}); restore it or build into a new --out") from exc
            changed = sorted(k for k in fixed if json.loads(json.dumps(fixed[k])) != before.get(k))
            if changed:
                raise ValueError(f"{self.cfg.out}: this build was started with other settings ({', '.join(changed)}; "
                                 f"see {path}); rerun with those, or build into a new --out")
        else:
            write_atomic(path, json.dumps(fixed, indent=2, sort_keys=True) + "\n")

    def _fingerprint(self) -> str:
        lines = (f"{p.product_id}\t{p.dataset}\t{p.category}\t{p.gender}\t{p.split}\t"
                 + "\t".join(f"{v.name}:{v.stat().st_size}" for v in p.views) for p in self.catalogue.products)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def _request(self, stage: Stage, user: list[Any], tag: dict[str, Any]) -> ChatRequest:
        return ChatRequest(user=user, system=self.prompts[stage].text, max_tokens=self.cfg.max_tokens[stage],
                           temperature=self.cfg.temperature[stage], tag={"stage": stage, **tag})

    def _run(self, stage: Stage, journal: Journal, items: list[WorkItem], validate: Any) -> None:
        if not items:
            return
        backend = self.backend_for(stage)
        try:
            stats = run_stage(stage, backend, items, journal, validate, self.cfg.attempts, self.cfg.progress)
        finally:
            backend.close()
        with Journal(self.work / "runs.jsonl") as runs:
            runs.append({"stage": stage, "model": backend.name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         **stats})

    @staticmethod
    def _require_answers(stage: Stage, unanswered: list[dict[str, Any]]) -> None:
        """The next stage needs every product settled: a request that never reached the model stops here."""
        if unanswered:
            raise BuildIncomplete(f"stage {stage}: {len(unanswered)} requests never got an answer (e.g. "
                                  f"{unanswered[0]['error']}); rerun the same command to retry them")

    def _journal(self, stage: Stage) -> Journal:
        """The stage's journal, its records kept (appended in place) for the summary's usage."""
        journal = Journal(self.work / f"{stage}.jsonl")
        self.records[stage] = journal.records
        return journal

    def captions(self) -> dict[str, dict[str, Any]]:
        with self._journal("captions") as journal:
            done = finished_keys(journal, self.cfg.retry_failed)
            items = [WorkItem(p.product_id, lambda p=p: self._request(
                "captions", caption_turn(p.views, self.cfg.max_side), {"products": [p.product_id]}),
                {"n_views": len(p.views)}) for p in self.catalogue.products if p.product_id not in done]
            self._run("captions", journal, items,
                      lambda item, text: check_captions(text, item.context["n_views"], self.cfg.ranges))
            latest = _latest(journal)
        self._require_answers("captions", [r for r in latest.values() if r.get("transport")])
        return latest

    def verify(self, clothing: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """{product id: the last settling record of a batch it was in}: products, not batches, are
        the unit, since a rerun (``--retry-failed``) may batch them differently."""
        with self._journal("verify") as journal:
            by_product = {pid: r for r in final_records(journal) for pid in r["products"]}
            retry = self.cfg.retry_failed
            todo = sorted(pid for pid in clothing if pid not in by_product or not by_product[pid]["ok"] and (
                by_product[pid].get("transport") or retry))
            size = self.cfg.verify_batch
            batches = [todo[i:i + size] for i in range(0, len(todo), size)]

            def build(ids: list[str]) -> ChatRequest:
                shown = [(pid, self.products[pid].views, clothing[pid]) for pid in ids]
                return self._request("verify", verify_turn(shown, self.composites), {"products": ids})

            items = [WorkItem(json.dumps(ids), lambda ids=ids: build(ids), {"products": ids}) for ids in batches]
            self._run("verify", journal, items, lambda item, text: check_verification(text, item.context["products"]))
            by_product = {pid: r for r in final_records(journal) for pid in r["products"] if pid in clothing}
        self._require_answers("verify", [r for r in by_product.values() if r.get("transport")])
        return by_product

    def _pools(self, retained: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
        """Computed once and kept: a resumed build must not depend on an encoder giving the same
        floats twice (GPU kernels need not)."""
        ids = sorted(retained)
        listing = "\n".join(f"{p}\t{self.split_of[p]}" for p in ids)
        key = {"products": hashlib.sha256(listing.encode()).hexdigest(), "neighbours": self.cfg.neighbours,
               "image_encoder": self.cfg.image_encoder, "text_encoder": self.cfg.text_encoder}
        cache = self.work / "candidate_pools.json"
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved["key"] == key:
                return saved["pools"]
        pools = self._search(ids, retained)
        write_atomic(cache, json.dumps({"key": key, "pools": pools}))
        return pools

    def _search(self, ids: list[str], retained: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
        image_enc, text_enc = build_encoders(self.cfg.image_encoder, self.cfg.text_encoder, self.cfg.device)
        paths: dict[str, np.ndarray] = {"image": image_enc.encode([self.products[p].views for p in ids])}
        for field_name in ("long_caption", "short_caption"):
            matrix = None
            for split in sorted({self.split_of[p] for p in ids}):
                rows = [i for i, p in enumerate(ids) if self.split_of[p] == split]
                enc = text_enc.encode([retained[ids[i]][field_name] for i in rows])
                matrix = np.zeros((len(ids), enc.shape[1]), np.float32) if matrix is None else matrix
                matrix[rows] = enc
            paths[field_name] = matrix if matrix is not None else np.zeros((0, 1), np.float32)
        groups = [(self.split_of[p], self.products[p].dataset, self.products[p].category, self.products[p].gender)
                  for p in ids]
        return candidate_pools(ids, groups, paths, self.cfg.neighbours)

    def triplets(self, retained: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        with self._journal("triplets") as journal:
            done = finished_keys(journal, self.cfg.retry_failed)
            sources = [p for p in sorted(retained) if p not in done]
            if sources:
                pools = self._pools(retained)

                def build(src: str, cands: list[str]) -> ChatRequest:
                    shown = [(c, self.products[c].views, retained[c]) for c in cands]
                    turn = triplet_turn((src, self.products[src].views, retained[src]), shown, self.composites)
                    return self._request("triplets", turn, {"source": src, "candidates": cands})

                def validate(item: WorkItem, text: str) -> list[dict[str, Any]]:
                    cands = item.context["candidates"]
                    sels = check_selections(text, len(cands), self.cfg.ranges, self.cfg.selections)
                    return [{"target_id": cands[s.pop("target") - 1], **s} for s in sels]

                items = []
                for src in sources:
                    cands = sample_candidates(src, pools.get(src, []), self.cfg.candidates, self.cfg.seed)
                    if cands:
                        items.append(WorkItem(src, lambda s=src, c=cands: build(s, c), {"candidates": cands}))
                    else:
                        journal.append({"key": src, "ok": True, "value": [], "candidates": [], "no_candidates": True})
                self._run("triplets", journal, items, validate)
            latest = _latest(journal)
        self._require_answers("triplets", [r for r in latest.values() if r.get("transport")])
        return latest

    def run(self) -> dict[str, Any]:
        stage1 = self.captions()
        answered = {k: r["value"] for k, r in stage1.items() if r["ok"]}
        clothing = {k: v for k, v in answered.items() if v["is_clothing"]}
        stage2 = self.verify(clothing)
        verdict = {pid: r["value"][pid] for pid, r in stage2.items() if r["ok"]}
        retained = {pid: clothing[pid] for pid in sorted(clothing) if verdict.get(pid) is False}
        stage3 = self.triplets(retained)
        triplets = {k: r["value"] for k, r in stage3.items() if r["ok"] and k in retained}
        for src, sels in triplets.items():  # guaranteed by the settings check; a broken journal must not leak
            for sel in sels:
                if sel["target_id"] not in retained or self.split_of[sel["target_id"]] != self.split_of[src]:
                    raise ValueError(f"{self.work / 'triplets.jsonl'}: {src} -> {sel['target_id']} crosses splits "
                                     "or names a product that is no longer retained; delete that file to redo stage 3")
        tables = write_release(self.cfg.out, self.products, self.split_of, retained, triplets)
        runs = read_journal(self.work / "runs.jsonl")
        summary = self._summary(stage1, clothing, stage2, verdict, retained, stage3, tables, runs)
        if self.cfg.chain is not None:  # from the release's own rows, so a rerun chains the same sessions
            summary["sessions"] = chain_release(self.cfg.out, SPLITS, *self.cfg.chain, seed=self.cfg.seed)
        else:
            remove_release_sessions(self.cfg.out, SPLITS)
        write_atomic(self.cfg.out / "build_summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return summary

    def _summary(self, stage1: dict[str, Any], clothing: dict[str, Any], stage2: dict[str, Any],
                 verdict: dict[str, bool], retained: dict[str, Any], stage3: dict[str, Any], tables: dict[str, Any],
                 runs: list[dict[str, Any]]) -> dict[str, Any]:
        failed2 = sum(1 for r in stage2.values() if not r["ok"])
        usage: dict[str, dict[str, Any]] = {s: _usage(self.records.get(s, [])) for s in STAGES}
        models = {s: sorted(usage[s]["answers_by_model"]) for s in STAGES}
        for run in runs:  # every finished run of a stage; a killed run's answers are in the journals
            usage[run["stage"]]["seconds"] = round(usage[run["stage"]].get("seconds", 0) + run["seconds"], 3)
        return {
            "catalogue": dict(self.catalogue.counts),
            "split": {"val_fraction": self.cfg.val_fraction, "seed": self.cfg.seed,
                      "products": {s: sum(1 for p in self.products if self.split_of[p] == s)
                                   for s in ("train", "val")}},
            "captions": {"requested": len(stage1), "non_clothing": sum(1 for r in stage1.values()
                                                                       if r["ok"] and not r["value"]["is_clothing"]),
                         "failed": sum(1 for r in stage1.values() if not r["ok"]), "clothing": len(clothing)},
            "verify": {"checked": len(verdict), "left_right_errors": sum(verdict.values()), "failed": failed2,
                       "retained": len(retained)},
            "triplets": {"sources": len(stage3), "failed": sum(1 for r in stage3.values() if not r["ok"]),
                         "no_candidates": sum(1 for r in stage3.values() if r.get("no_candidates")),
                         "without_selection": sum(1 for r in stage3.values() if r["ok"] and not r["value"]),
                         "per_split": tables["triplets"]},
            "released_products": tables["products"],
            "view_combinations": tables["view_combinations"],
            "caption_words": tables["caption_words"],
            "models": models,
            "prompts": {s: {"file": p.source, "sha256": p.sha256} for s, p in self.prompts.items()},
            "settings": {k: v for k, v in asdict(self.cfg).items() if k not in ("catalogue", "out", "progress")},
            "usage": usage,
        }


def build(config: BuildConfig, backend_for: Callable[[Stage], ChatBackend]) -> dict[str, Any]:
    return Build(config, backend_for).run()
