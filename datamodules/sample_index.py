"""Byte ranges of every sample of a split's triplet shards, so training can read samples in any order.

A WebDataset sample is a run of consecutive tar members with the same key; ``ShardWriter`` writes
them back to back, so one sample is one contiguous range of the file, from its first member's header
to the end of its last member's data. ``{split}-triplets-offsets.json``, cached next to the shards
(rebuilt when a shard's size or mtime changes, like the gallery's index in ``negatives.py``), holds
three numbers per sample: shard, start, end. Reading a sample is one seek and one read; the range is
then split into members by ``tarfile`` in memory.

Why ranges and not a per-member index: FashionMV's train split has 188K triplets of up to 10 views;
three integers a sample keep the index a few MB, loaded once and shared by forked workers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_json_atomic
from .shards import read_manifest, shard_urls

log = logging.getLogger(__name__)

INDEX_FORMAT = "fashion-cir-sample-ranges/1"
_BLOCK = tarfile.BLOCKSIZE


def index_path(data_dir: str | Path, split: str, kind: str = "triplets") -> Path:
    return Path(data_dir) / f"{split}-{kind}-offsets.json"


# WebDataset's split of a member name into sample key and extensions (``base_plus_ext``): the key runs
# to the first dot after the last folder that leaves it non-empty. The same pattern, so both readers
# group members into samples alike.
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a member name, as WebDataset splits it; None where it skips the member."""
    found = _KEY_AND_EXT.match(name)
    return (found.group(1), found.group(2)) if found else None


def keyed_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, sample key, extension) of every file member WebDataset would read, in file order."""
    for info in tar:
        split = member_key(info.name) if info.isfile() else None
        if split is not None:
            yield info, split[0], split[1]


def scan_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the samples of one tar, in file order (headers only are read).

    A tar damaged part-way (a truncated copy) keeps the samples before the damage, as WebDataset's
    reader does, less the last one, which may have lost members; a warning names the shard."""
    ranges: list[tuple[int, int]] = []
    current: str | None = None
    try:
        with tarfile.open(path) as tar:
            for info, key, _ in keyed_members(tar):
                end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
                if key == current:
                    ranges[-1] = (ranges[-1][0], end)
                else:
                    ranges.append((info.offset, end))
                    current = key
    except tarfile.TarError as error:
        ranges = ranges[:-1]
        log.warning("%s is damaged (%s): training reads its first %d samples; repair or rewrite the shard",
                    path, error, len(ranges))
    return ranges


def shard_stamp(path: Path) -> dict[str, Any]:
    """What a cached index of a shard checks to know the shard is unchanged."""
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class SampleIndex:
    """Where each sample of one split's shards lies: ``shard[i]``, ``start[i]``, ``end[i]``."""

    data_dir: Path
    shards: list[str]
    shard: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)

    @classmethod
    def load(cls, data_dir: str | Path, split: str, kind: str = "triplets") -> SampleIndex:
        """The cached index when it still matches the shards, else a scan (tar headers only), cached."""
        data_dir = Path(data_dir)
        urls = [Path(u) for u in shard_urls(data_dir, read_manifest(data_dir), split, kind)]
        stamps = [shard_stamp(u) for u in urls]
        cache = index_path(data_dir, split, kind)
        body: dict[str, Any] | None = None
        if cache.is_file():
            try:
                body = json.loads(cache.read_text())
            except json.JSONDecodeError:  # damaged by hand or by a full disk: scan again
                body = None
            if body is not None and (body.get("format") != INDEX_FORMAT or body.get("shards") != stamps):
                body = None
        if body is None:
            columns: dict[str, list[int]] = {"shard": [], "start": [], "end": []}
            for number, url in enumerate(urls):
                for start, end in scan_ranges(url):
                    columns["shard"].append(number)
                    columns["start"].append(start)
                    columns["end"].append(end)
            body = {"format": INDEX_FORMAT, "split": split, "kind": kind, "shards": stamps, **columns}
            try:
                write_json_atomic(cache, body)
            except OSError as error:  # a read-only data folder: scan again next time
                log.warning("could not cache the sample index in %s (%s); it is rebuilt at every start", cache, error)
        return cls(data_dir, [s["name"] for s in stamps], np.asarray(body["shard"], dtype=np.int32),
                   np.asarray(body["start"], dtype=np.int64), np.asarray(body["end"], dtype=np.int64))


class SampleReader:
    """Raw samples by index number, as ``wds.tarfile_to_samples`` yields them (``__key__``,
    ``__url__`` and one bytes value per member extension, lower-cased).

    File handles open lazily in the process that reads (a DataLoader worker), never inherited by a
    forked child, whose reads would move the parent's file offsets."""

    def __init__(self, index: SampleIndex) -> None:
        self.index = index
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def __call__(self, i: int) -> dict[str, Any]:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        number = int(self.index.shard[i])
        url = str(self.index.data_dir / self.index.shards[number])
        if number not in self._files:
            self._files[number] = open(url, "rb")  # noqa: SIM115 - kept open for the worker's life
        f = self._files[number]
        start = int(self.index.start[i])
        f.seek(start)
        chunk = f.read(int(self.index.end[i]) - start)
        sample: dict[str, Any] = {"__url__": url}
        with tarfile.open(fileobj=io.BytesIO(chunk)) as tar:
            for info, key, ext in keyed_members(tar):
                extracted = tar.extractfile(info)
                if extracted is None:
                    continue
                sample["__key__"] = key
                sample[ext.lower()] = extracted.read()
        if "__key__" not in sample:
            raise tarfile.ReadError(f"{url}: no tar member at bytes {start}-{int(self.index.end[i])}; the shard "
                                    f"changed after its index {index_path(self.index.data_dir, '<split>')} was built")
        return sample
