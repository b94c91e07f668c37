"""The change log of a served gallery (``MutableGallery``): its record format, and reading it back.

The log never holds pickles: it is ``MAGIC`` then records of ``<u32 length><u32 crc32><payload>``,
a payload being ``<u32 n><n bytes of JSON><float32 little-endian vectors>``. A kill mid-append
leaves a torn last record, found by its length or checksum and left out by ``read_log``; damage
followed by more records is not a kill's and is refused.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOG = "changes.log"
MAGIC = b"CIRCHG1\n"
_FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
_COUNT = struct.Struct("<I")


def as_f32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def encode_record(head: Mapping[str, Any], vectors: np.ndarray | None = None) -> bytes:
    body = json.dumps(head, separators=(",", ":")).encode()
    payload = _COUNT.pack(len(body)) + body + (b"" if vectors is None else as_f32(vectors).astype("<f4").tobytes())
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> tuple[dict[str, Any], np.ndarray | None]:
    (n,) = _COUNT.unpack_from(payload)
    head = json.loads(payload[_COUNT.size:_COUNT.size + n])
    raw = payload[_COUNT.size + n:]
    if "shape" not in head:
        return head, None
    return head, np.frombuffer(raw, dtype="<f4").reshape(head["shape"]).astype(np.float32)


def read_log(path: Path) -> tuple[list[tuple[dict[str, Any], np.ndarray | None]], int]:
    """The log's records and the byte length of its whole part. A damaged last record (a kill
    mid-append) is left out; damage followed by more records is not a kill's and is refused."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path}: not a gallery change log (it does not start with {MAGIC!r}); move it away "
                         "to serve the index without its changes")
    records, at = [], len(MAGIC)
    while at < len(data):
        whole = at + _FRAME.size <= len(data)
        length, crc = _FRAME.unpack_from(data, at) if whole else (0, 0)
        end = at + _FRAME.size + length
        record = None
        if whole and length >= _COUNT.size and end <= len(data) and zlib.crc32(data[at + _FRAME.size:end]) == crc:
            try:
                record = decode_payload(data[at + _FRAME.size:end])
            except (struct.error, ValueError):  # a checksum that matches by chance over garbage
                record = None
        if record is None:
            # A kill mid-append leaves a torn last record; a power cut may leave zeros where the file
            # grew. Anything else after damage is not a torn write.
            if whole and end < len(data) and data[at:].strip(b"\0"):
                raise ValueError(f"{path}: damaged record at byte {at} with {len(data) - end} bytes after it (not a "
                                 "torn last write); restore the folder from a copy")
            break  # everything before it stands
        records.append(record)
        at = end
    if not records or records[0][0].get("op") != "header":
        raise ValueError(f"{path}: no header record; move it away to serve the index without its changes")
    return records, at
