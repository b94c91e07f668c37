"""WebDataset shards: the on-disk format every dataset is converted to, and its safe decoding.

A shard folder holds ``manifest.json`` and, per split, ``{split}-triplets-NNNNNN.tar`` (one triplet
per sample: source views, target views, texts as JSON) and ``{split}-gallery-NNNNNN.tar`` (one
product per sample). Member names are ``src0.jpg``…, ``tgt0.jpg``…, ``view0.jpg``…, ``json``.

Decoding is done here, not with ``webdataset.decode``: its default handlers unpickle ``.pyd`` /
``.pickle`` members, and shards are data from elsewhere. Only image, JSON and text members are ever
decoded; anything else is dropped unread. In the training and evaluation pipelines a colour JPEG view
stays undecoded (``fast_decode.LazyJpeg``) until the model's transform knows the size it needs.

Skip what is corrupt, stop on what is broken: damaged data (an image that does not decode, bad JSON
or UTF-8, a missing member or metadata key, a damaged tar stream) raises ``CorruptSample`` (or
tarfile's ``TarError``), which ``SkipCounter`` skips and counts up to a budget (``skip_budget``);
any other exception is a bug and stops the run at once, naming the sample (``KeyedStage``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from .fast_decode import CorruptSample, decode_now, open_view, sample_where
from .schema import Product, Triplet, safe_key

__all__ = ["MANIFEST", "CorruptSample", "KeyedStage", "ShardSetWriter", "SkipCounter", "StageError",
           "TooManyCorruptSamples", "decode_sample", "encode_image", "encode_product", "gallery_key",
           "is_corrupt", "iterate_shards", "read_manifest", "sample_where", "shard_urls", "skip_budget",
           "write_manifest"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}
TEXT_EXTS = {"txt"}
JSON_EXTS = {"json"}
# Below this many bytes a member cannot be a real image of any size we write; fail fast and clearly.
_MIN_IMAGE_BYTES = 16


def encode_image(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_product(product: Product) -> tuple[dict[str, Any], list[bytes]]:
    """Metadata and JPEG bytes of a product: what shards store, a fraction of the decoded size."""
    return product.meta(), [encode_image(v) for v in product.views]


def gallery_key(dataset: str, product_id: str) -> str:
    return safe_key(f"{dataset}--{product_id}")


class ShardSetWriter:
    """Writes one split's triplet and gallery shards and tallies what went where."""

    def __init__(self, out_dir: str | Path, split: str, maxcount: int = 500) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.maxcount = maxcount
        self.counts = {"triplets": 0, "products": 0}
        self.session_lengths: dict[int, int] = {}  # turns → sessions written (session_shards.write_session)
        self._writers: dict[str, wds.ShardWriter] = {}

    def _writer(self, kind: str) -> wds.ShardWriter:
        if kind not in self._writers:
            pattern = str(self.out_dir / f"{self.split}-{kind}-%06d.tar")
            self._writers[kind] = wds.ShardWriter(pattern, maxcount=self.maxcount, verbose=0)
        return self._writers[kind]

    def write_product(self, meta: dict[str, Any], views: list[bytes]) -> None:
        sample: dict[str, Any] = {"__key__": gallery_key(meta["dataset"], meta["product_id"]), "json": meta}
        sample.update({f"view{i}.jpg": b for i, b in enumerate(views)})
        self._writer("gallery").write(sample)
        self.counts["products"] += 1

    def write_triplet(self, triplet: Triplet, source: tuple[dict[str, Any], list[bytes]],
                      target: tuple[dict[str, Any], list[bytes]] | None) -> None:
        """One query sample; ``target`` None writes a query-only sample (test splits without answers)."""
        meta = {"triplet": triplet.meta(), "source": source[0], "target": target[0] if target else None}
        # The running index keeps keys unique: one pair can come with several modification texts.
        key = safe_key(f"{triplet.dataset}--{self.counts['triplets']:07d}--{triplet.key}")
        sample: dict[str, Any] = {"__key__": key, "json": meta}
        sample.update({f"src{i}.jpg": b for i, b in enumerate(source[1])})
        if target is not None:
            sample.update({f"tgt{i}.jpg": b for i, b in enumerate(target[1])})
        self._writer("triplets").write(sample)
        self.counts["triplets"] += 1

    def write(self, kind: str, sample: dict[str, Any]) -> None:
        """A sample of another kind (``sessions``), counted under that name."""
        self._writer(kind).write(sample)
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def close(self) -> dict[str, Any]:
        for w in self._writers.values():
            w.close()
        # Only kinds this split has: a folder without sessions keeps the manifest it always had.
        kinds = ["triplets", "gallery"] + sorted(set(self._writers) - {"triplets", "gallery"})
        # Only this writer's names ({split}-{kind}-NNNNNN.tar): a chained folder's session tars
        # ({split}-sessions-c{N}-NNNNNN.tar) or other leftovers must never join this split's list.
        own = {kind: re.compile(rf"{re.escape(self.split)}-{re.escape(kind)}-\d{{6}}\.tar") for kind in kinds}
        shards = {kind: sorted(p.name for p in self.out_dir.glob(f"{self.split}-{kind}-*.tar")
                               if own[kind].fullmatch(p.name)) for kind in kinds}
        extra = {"session_lengths": {str(k): v for k, v in sorted(self.session_lengths.items())}} \
            if self.session_lengths else {}
        return {**self.counts, **extra, "shards": shards}


def write_manifest(out_dir: str | Path, splits: dict[str, dict[str, Any]], datasets: Iterable[str],
                   source: dict[str, Any]) -> Path:
    path = Path(out_dir) / MANIFEST
    manifest = {"format": "fashion-cir-shards/1", "datasets": sorted(set(datasets)), "splits": splits,
                "source": source}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)  # atomic: a half-written manifest must never look like finished data
    return path


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a shard folder. Create one with `cir data synthetic --out "
            f"{data_dir}` (generated data) or a converter (`cir data --help`)."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc}); rewrite the folder with the converter that made it") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: a JSON {type(manifest).__name__}, not an object; rewrite the folder with the "
                         "converter that made it")
    if manifest.get("format") != "fashion-cir-shards/1":
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r}; expected 'fashion-cir-shards/1'")
    return manifest


def shard_urls(data_dir: str | Path, manifest: dict[str, Any], split: str, kind: str) -> list[str]:
    if split not in manifest["splits"]:
        raise KeyError(f"{Path(data_dir) / MANIFEST}: no split {split!r}; it has {sorted(manifest['splits'])}")
    return [str(Path(data_dir) / name) for name in manifest["splits"][split]["shards"][kind]]


# --- reading ------------------------------------------------------------------------------------


# The config key that sets the budget, named in the error that enforces it.
SKIP_RATE_KEY = "data.init_args.max_skip_rate"
# How many skipped errors a TooManyCorruptSamples message quotes.
FIRST_ERRORS = 3


def is_corrupt(exn: BaseException) -> bool:
    """Whether ``exn`` is damaged data (skip it) rather than a bug (stop). Only ``CorruptSample``,
    which this package's decoders and example classes raise for a sample's decode and format errors,
    and tarfile's errors, which WebDataset's tar reader raises for a damaged stream and which cannot
    be wrapped there. Raw ``KeyError``/``JSONDecodeError``/PIL errors are deliberately not in this
    list: decoding wraps the ones the data causes, so one that reaches a handler unwrapped comes
    from code, not data."""
    return isinstance(exn, CorruptSample | tarfile.TarError)


class TooManyCorruptSamples(RuntimeError):
    """More corrupt samples than a stream's budget: the data (or its reader) is damaged beyond what
    skipping may hide. Takes one message argument, so it survives DataLoader workers' re-raise."""


class StageError(RuntimeError):
    """A per-sample stage failed with an error that is not damaged data (see ``KeyedStage``)."""


def skip_budget(samples: int, rate: float) -> int:
    """How many corrupt samples a stream of ``samples`` may skip at a skip rate of ``rate`` (a
    fraction: 0.01 is 1%): ``floor(rate × samples)``, at least 0. A budget of 0 stops at the first
    corrupt sample. The tiny epsilon keeps binary rounding (0.29 × 100 = 28.999…) from costing one."""
    if rate < 0 or math.isnan(rate):
        raise ValueError(f"{SKIP_RATE_KEY}={rate}: a skip rate is a fraction of the samples, at least 0")
    return max(0, math.floor(rate * max(samples, 0) + 1e-9))


def _describe(exn: BaseException, limit: int = 400) -> str:
    text = f"{type(exn).__name__}: {exn}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SkipCounter:
    """WebDataset error handler: skips and counts corrupt samples, stops on everything else.

    - A corrupt-sample error (``is_corrupt``: ``CorruptSample``, tarfile's errors) is skipped
      (returns True), counted in ``count`` and logged, its description kept among the first
      ``FIRST_ERRORS`` in ``first_errors``.
    - Any other exception is re-raised at once: a deterministic bug in a transform fails every
      sample, and counting it as corrupt data would hide it (the training stream would loop on
      warnings, evaluation would end with empty metrics).
    - Once ``count`` exceeds ``budget`` (None: no limit), raises ``TooManyCorruptSamples`` naming
      the stream, the count, the budget and the first errors.

    One instance lives in each DataLoader worker, so ``count`` and ``budget`` are per worker (give
    each its share, e.g. ``skip_budget(samples_of_this_worker, rate)``); the count also travels with
    every batch (see ``tag_skipped``) so the main process can total it across workers. Picklable.
    """

    def __init__(self, name: str, budget: int | None = None) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"SkipCounter({name!r}): budget={budget}, expected None or at least 0")
        self.name = name
        self.budget = budget
        self.count = 0
        self.first_errors: list[str] = []
        self.seen: set[str] = set()

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, TooManyCorruptSamples):
            raise exn  # raised by this handler in an inner stage (tar members), seen again by an outer one
        if not is_corrupt(exn):
            note = f"(in data stream {self.name!r}: not a corrupt-sample error, so the run stops)"
            if note not in getattr(exn, "__notes__", ()):  # nested tar stages hand it over twice
                exn.add_note(note)
            raise exn
        where = getattr(exn, "where", None)
        if where is None and isinstance(exn, tarfile.TarError):
            # WebDataset's nested tar stages hand one damaged stream to the handler twice, wrapped
            # differently; both name the file: one damaged shard, one count.
            found = re.search(r"name='([^']+)'", str(exn))
            where = f"{found.group(1)}: damaged tar stream" if found else None
        if where is not None:
            if where in self.seen:  # read again (a worker filling its last batch): counted once
                return True
            self.seen.add(where)
        self.count += 1
        if len(self.first_errors) < FIRST_ERRORS:
            self.first_errors.append(_describe(exn))
        log.warning("skipping a corrupt sample in %s (%d skipped so far%s): %s", self.name, self.count,
                    "" if self.budget is None else f", budget {self.budget}", _describe(exn))
        if self.budget is not None and self.count > self.budget:
            raise TooManyCorruptSamples(self.message()) from exn
        return True

    def message(self) -> str:
        """Why the stream stops: the count against the budget, the first errors, the remedy."""
        errors = "\n".join(f"  {i}. {e}" for i, e in enumerate(self.first_errors, 1))
        return (f"data stream {self.name!r}: {self.count} corrupt samples skipped, more than its budget of "
                f"{self.budget}. The first {len(self.first_errors)}:\n{errors}\n"
                f"Repair or regenerate the shards; if this much damage is expected, raise the limit with "
                f"{SKIP_RATE_KEY} (the share of an epoch's samples that may be skipped; 0.01 by default).")


def _corrupt(where: str, detail: str) -> CorruptSample:
    """A ``CorruptSample`` naming its sample, in its message and as ``where`` (``SkipCounter`` counts
    each sample once, however often it is read)."""
    exn = CorruptSample(f"{where}: {detail}")
    exn.where = where  # type: ignore[attr-defined]
    return exn


class KeyedStage:
    """A per-sample map function (e.g. ``TripletExample``) whose errors name their sample.

    Calls ``fn(sample)``. A corrupt-sample error (``is_corrupt``) comes out as ``CorruptSample``
    starting with the sample's ``url:key``, so ``SkipCounter.first_errors`` names keys; any other
    exception as ``StageError``, its message starting with the sample's ``url:key`` and chained to
    the original (``raise … from``), so a planted bug in a transform stops the run naming the first
    sample it failed on. A class, not a closure, so DataLoader workers can pickle it (``fn`` must
    pickle too).
    """

    def __init__(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        self.fn = fn

    def for_epoch(self, epoch: int) -> KeyedStage:
        """The same stage around ``fn.for_epoch(epoch)`` (``TripletExample`` and its wrappers)."""
        return KeyedStage(self.fn.for_epoch(epoch))  # type: ignore[attr-defined]

    def __call__(self, sample: dict[str, Any]) -> Any:
        try:
            return self.fn(sample)
        except Exception as exn:
            where = sample_where(sample)
            if is_corrupt(exn):
                if isinstance(exn, CorruptSample) and str(exn).startswith(where):
                    exn.where = where  # type: ignore[attr-defined]
                    raise  # already names its sample (decode_sample, the example classes)
                detail = str(exn) if type(exn) is CorruptSample else _describe(exn)
                raise _corrupt(where, detail) from exn
            raise StageError(f"{where}: {type(exn).__name__}: {exn}") from exn


def decode_sample(sample: dict[str, Any], lazy: bool = True) -> dict[str, Any]:
    """Decode image/JSON/text members; every other member is dropped without being read.

    ``lazy``: colour JPEG views become ``LazyJpeg`` images, decoded when first used (at a reduced
    scale by the backbones' transforms), so a corrupt one fails in the transform, not here; other
    images are always decoded here. Off: every image is fully decoded here, as RGB.

    Damaged members (an image that does not decode or is too small to be one, JSON or UTF-8 that
    does not parse, a ``json`` member that is not an object) and a missing ``json`` member raise
    ``CorruptSample`` naming the sample's ``url:key`` and the member.
    """
    out: dict[str, Any] = {}
    where = sample_where(sample)
    for name, value in sample.items():
        if name.startswith("__"):
            out[name] = value
            continue
        ext = name.rsplit(".", 1)[-1].lower()
        try:
            if ext in IMAGE_EXTS:
                if len(value) < _MIN_IMAGE_BYTES:
                    raise CorruptSample(f"{len(value)} bytes, not an image")
                out[name] = open_view(value) if lazy else decode_now(value)
            elif ext in JSON_EXTS:
                out[name] = json.loads(value)
                if not isinstance(out[name], dict):
                    raise CorruptSample(f"a JSON {type(out[name]).__name__}, not an object")
            elif ext in TEXT_EXTS:
                out[name] = value.decode("utf-8")
        except (CorruptSample, json.JSONDecodeError, UnicodeDecodeError) as exn:
            # JSONDecodeError and UnicodeDecodeError are ValueErrors: name them, the message alone is terse.
            detail = str(exn) if type(exn) is CorruptSample else _describe(exn)
            raise _corrupt(where, f"member {name!r}: {detail}") from exn
    if "json" not in out:
        raise _corrupt(where, "sample has no json member")
    return out


def iterate_shards(urls: list[str], handler: Callable[[Exception], bool] | None = None,
                   lazy: bool = False) -> Iterable[dict]:
    """Decoded samples of ``urls`` in order, single process (converters, captioners, tests).

    Images are fully decoded by default, so a corrupt sample is skipped here (with ``handler``)
    rather than failing its reader later; ``lazy`` as in ``decode_sample``.
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=handler or wds.reraise_exception),
        wds.map(partial(decode_sample, lazy=lazy), handler=handler or wds.reraise_exception),
    )
    return iter(pipeline)
