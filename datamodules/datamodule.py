"""Streams a shard folder (see ``shards.py``) for training and evaluation.

Training: each epoch one pass over the training triplets in a seeded global permutation, dealt out
so every DDP rank runs the same number of full batches and none waits forever in a collective
(``epoch_plan.py``); or, with ``sampling="resampled"``, an endless stream of resampled shards. Either
is a schedule a resumed run continues exactly (``resumable.py``, ``train_epochs.py``). Evaluation:
every sample exactly once, split over workers by shard and over ranks by sample (so no rank is
left without data, whatever the shard count); the validation step sees the gallery (dataloader 0)
before the queries (dataloader 1), and with ``eval_sessions`` the split's multi-turn sessions
(dataloader 2, flattened to one row per turn: ``session_batches.py``). ``train_on="sessions"``
trains on the training split's sessions instead of its triplets, with the same epoch plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import webdataset as wds

from .batching import (
    GalleryExample,
    ImageTransform,
    QueryViews,
    ResizeToTensor,
    TargetPad,
    TextMode,
    TripletExample,
    collate,
)
from .epoch_plan import EpochPlan
from .negatives import GalleryReader, WithNegatives, read_negatives
from .resumable import ResumableLoader, TrainStream
from .sample_index import SampleIndex, SampleReader
from .schema import stable_id
from .session_batches import SessionRows, collate_session_rows
from .session_shards import SESSION_KIND, SessionExample
from .shards import KeyedStage, SkipCounter, decode_sample, iterate_shards, read_manifest, shard_urls, skip_budget
from .sidecar import read_sidecar
from .train_epochs import Sampling, TrainEpochs

log = logging.getLogger(__name__)

TrainOn = Literal["triplets", "sessions"]


class TagSkipped:
    """Last pipeline stage: attach this worker's skip count so the main process can total it."""

    def __init__(self, loader: str, counter: SkipCounter) -> None:
        self.loader = loader
        self.counter = counter

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        info = torch.utils.data.get_worker_info()
        batch["_skipped"] = (self.loader, info.id if info else 0, self.counter.count)
        return batch


class SplitSamplesByRank:
    """Keep every world-th raw sample on each rank (before decoding). Evaluation splits by sample,
    not by shard, so a rank never ends up empty when there are fewer shards than ranks. Rank and
    world size come from the Trainer: DataLoader workers do not see the process group."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for i, sample in enumerate(src):
            if i % self.world == self.rank:
                yield sample


class ShardDataModule(L.LightningDataModule):
    """Triplet and gallery shards of one shard folder.

    Args:
        data_dir: folder with ``manifest.json`` and the shards.
        batch_size: triplets per batch per device.
        eval_batch_size: gallery products / queries per batch in evaluation.
        num_workers: DataLoader worker processes per device.
        image_size: side of the default square resize; a model replaces the transform with its
            backbone's own preprocessing through ``set_image_transform``.
        train_text: which modification text training uses (evaluation always uses the short one).
        sampling: ``permutation`` (default): an epoch is one pass over the training triplets in a
            seeded permutation of the whole split, shared by every rank and worker, so each triplet
            is trained on exactly once per epoch; the ``n mod (batch_size × ranks)`` triplets that
            cannot fill an equal batch on every rank are left out of that epoch (logged; different
            ones each epoch). ``resampled``: shards drawn with replacement per worker and shuffled
            through ``shuffle_buffer`` (an endless stream: about 63% of the shards are read in an
            "epoch" of S shard draws, and batches come from a window of neighbouring records).
        shuffle_buffer: samples held for shuffling in each training worker (``resampled`` only).
        max_skip_rate: the share of a stream's samples (an epoch's training samples, a split's
            gallery or queries; each DataLoader worker gets its share) that may be skipped as corrupt
            (an image that does not decode, bad JSON, a missing member) before the run stops naming
            the first errors. Any other error in reading or transforming a sample is a bug and stops
            the run at once, naming the sample.
        val_split: the split of ``validate`` and of validation during ``fit``.
        test_split: the split of ``test`` (default: ``val_split``).
        predict_split: the split of ``predict`` (default: ``test_split``); may be query-only.
        target_pad_ratio: pad images to this aspect ratio before the model's preprocessing
            (CLIP4Cir's "targetpad" for FashionIQ: 1.25); None keeps them as they are.
        captions_file: a ``cir caption`` sidecar (JSON lines); its captions replace the products' own
            (``source_caption`` / ``target_caption`` in batches).
        seed: seed of shard resampling and shuffling.
        bucket_batches: 0 batches samples in stream order; N > 0 holds N batches' worth of samples,
            groups samples of similar view (or patch) counts into the same batches and yields them
            in a seeded random order: less padding, the same batch size and steps per rank
            (``datamodules/bucketing.py``). ``padding_fraction()`` reports the effect.
        hard_negatives: K > 0 adds the views of each training triplet's first K mined negatives
            (``negative_images``, ``negative_mask``, ``negative_ids``), read from
            ``negatives-train.json`` next to the shards, which ``cir mine-negatives`` writes.
        query_views: ``all``: evaluation queries (validate, test, predict) carry every view of their
            source; ``first``: only the source's first view (the first one stored), to measure how
            much a model relies on the other views (``benchmarks/view_incompleteness.py``). The
            gallery and training are unchanged.
        train_on: ``triplets`` (default) or ``sessions``: the training split's multi-turn sessions
            (``{split}-sessions-*.tar``), ``batch_size`` sessions a batch, each flattened to one
            row per turn (``session_batches.flatten_sessions``); the epoch is one pass over the
            sessions, planned and resumed as the triplets' (``sampling`` applies alike). Not with
            ``bucket_batches`` or ``hard_negatives``.
        eval_sessions: also evaluate the evaluation split's sessions, a third dataloader after the
            gallery and the queries (``eval_batch_size`` sessions a batch): per-turn Recall@K
            (``core.session_eval``). Not in ``predict``.
    """

    def __init__(self, data_dir: str = "data/synthetic", batch_size: int = 32, eval_batch_size: int = 64,
                 num_workers: int = 2, image_size: int = 64, train_text: TextMode = "short",
                 shuffle_buffer: int = 500, val_split: str = "val", test_split: str | None = None,
                 predict_split: str | None = None, target_pad_ratio: float | None = None,
                 captions_file: str | None = None, seed: int = 0, bucket_batches: int = 0,
                 hard_negatives: int = 0, query_views: QueryViews = "all",
                 sampling: Sampling = "permutation", max_skip_rate: float = 0.01, train_on: TrainOn = "triplets",
                 eval_sessions: bool = False) -> None:
        super().__init__()
        problems = [f"{key}={value}: must be >= 1" for key, value in
                    (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)) if value < 1]
        problems += [f"num_workers={num_workers}: must be >= 0"] if num_workers < 0 else []
        problems += [f"{key}={value}: must be >= 0 (0 = off)" for key, value in
                     (("bucket_batches", bucket_batches), ("hard_negatives", hard_negatives)) if value < 0]
        problems += [f"shuffle_buffer={shuffle_buffer}: must be >= 1"] if shuffle_buffer < 1 else []
        if not 0 <= max_skip_rate <= 1:
            problems.append(f"max_skip_rate={max_skip_rate}: a share of the samples, from 0 to 1")
        if sampling not in ("permutation", "resampled"):
            problems.append(f"sampling={sampling!r}: must be 'permutation' or 'resampled'")
        if query_views not in ("all", "first"):
            problems.append(f"query_views={query_views!r}: must be 'all' or 'first'")
        if train_on not in ("triplets", "sessions"):
            problems.append(f"train_on={train_on!r}: must be 'triplets' or 'sessions'")
        elif train_on == "sessions":
            problems += [f"train_on=sessions with {key}={value}: sessions are batched whole; set {key}=0"
                         for key, value in (("bucket_batches", bucket_batches), ("hard_negatives", hard_negatives))
                         if value]
        if problems:
            raise ValueError("data.init_args: " + "; ".join(problems))
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.image_transform: ImageTransform = ResizeToTensor(image_size)
        self.set_image_transform(self.image_transform)
        self.skipped: dict[tuple[str, int], int] = {}
        self._padding = [0, 0]  # padded and all view slots (or patch positions) of training batches
        self._resume_stream: dict[str, int] | None = None  # from a checkpoint (``load_state_dict``)
        self._manifest: dict[str, Any] | None = None
        self._train_index: SampleIndex | None = None
        self._captions: dict[str, str] | None = None

    # -- set-up ----------------------------------------------------------------------------------
    def set_image_transform(self, transform: ImageTransform) -> None:
        ratio = self.hparams.target_pad_ratio
        self.image_transform = TargetPad(ratio, transform) if ratio else transform

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = read_manifest(self.data_dir)
        return self._manifest

    @property
    def train_index(self) -> SampleIndex:
        """The training split's sample index (of its triplets, or of its sessions with
        ``train_on=sessions``), loaded (or built) once, in the main process: every worker shares it,
        none rescans."""
        if self._train_index is None:
            self._train_index = SampleIndex.load(self.data_dir, "train", self.train_kind)
        return self._train_index

    @property
    def train_kind(self) -> str:
        """The shard kind training reads: ``triplets`` or ``sessions``."""
        return SESSION_KIND if self.hparams.train_on == "sessions" else "triplets"

    def require_sessions(self, split: str, key: str) -> None:
        """A one-line refusal when ``split`` has no sessions but ``key`` asks for them."""
        entry = self.manifest["splits"].get(split, {})
        if not entry.get("sessions") or not entry.get("shards", {}).get(SESSION_KIND):
            raise ValueError(f"data.init_args.{key}: {self.data_dir}/manifest.json's split {split!r} has no sessions "
                             f"({split}-sessions-*.tar); write them first (session_shards.write_session) or turn "
                             f"{key} off")

    @property
    def captions(self) -> dict[str, str] | None:
        """The ``captions_file`` sidecar as {key: text}, read once (None without one)."""
        if self._captions is None and self.hparams.captions_file:
            self._captions = {k: v["text"] for k, v in read_sidecar(self.hparams.captions_file).items()}
        return self._captions

    @property
    def datasets(self) -> list[str]:
        return list(self.manifest["datasets"])

    def prepare_data(self) -> None:
        read_manifest(self.data_dir)  # fail here, with the fix in the message, rather than in a worker
        if self.hparams.train_on == "sessions":
            self.require_sessions("train", "train_on")

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def padding_fraction(self, reset: bool = False) -> float | None:
        """Share of the image slots of the training batches seen so far (or since the last reset)
        that are padding: view slots for tensor views, patch positions for Qwen; None before any."""
        padded, total = self._padding
        if reset:
            self._padding = [0, 0]
        return padded / total if total else None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "_skipped" in batch:
            loader, worker, count = batch.pop("_skipped")
            self.skipped[(loader, worker)] = count
        if isinstance(batch, dict) and "_padding" in batch:
            padded, total = batch.pop("_padding")
            self._padding = [self._padding[0] + padded, self._padding[1] + total]
        return batch

    # -- loaders ---------------------------------------------------------------------------------
    def _loader(self, pipeline: wds.DataPipeline, n_shards: int) -> wds.WebLoader:
        workers = min(self.hparams.num_workers, n_shards)
        return wds.WebLoader(pipeline, batch_size=None, num_workers=workers,
                             persistent_workers=workers > 0)

    def train_batches_per_rank(self) -> int:
        """Training steps of one epoch on every rank, whatever the shard count."""
        _, world = self._world()
        if self.hparams.sampling == "resampled":
            per_worker, workers = self.train_batches_per_worker()
            return per_worker * workers
        n = len(self.train_index)  # what the plan deals, even from a damaged shard
        per_rank = EpochPlan(n, self.hparams.batch_size, world, self.hparams.seed, 0).batches_per_rank
        if per_rank == 0:
            raise ValueError(f"{self.data_dir}: the train split has {n} {self.train_kind}, fewer than one batch on "
                             f"every rank (data.init_args.batch_size={self.hparams.batch_size} x {world} ranks); lower "
                             "the batch size")
        return per_rank

    def train_batches_per_worker(self) -> tuple[int, int]:
        """(the most batches any worker runs, workers); with ``resampled`` every worker runs exactly that many."""
        _, world = self._world()
        workers = max(1, self.hparams.num_workers)
        if self.hparams.sampling == "permutation":
            return math.ceil(self.train_batches_per_rank() / workers), workers
        n = self.manifest["splits"]["train"][self.train_kind]
        batches = max(1, n // (self.hparams.batch_size * world))
        return math.ceil(batches / workers), workers

    def train_dataloader(self) -> ResumableLoader:
        hp = self.hparams
        per_worker, workers = self.train_batches_per_worker()
        rank, world = self._world()
        length = self.train_batches_per_rank()
        reader = None
        if hp.sampling == "permutation":
            index = self.train_index
            reader = SampleReader(index)
            plan = EpochPlan(len(index), hp.batch_size, world, hp.seed, 0)
            if rank == 0:
                log.info("training epochs: %d %s in %d steps of %d x %d ranks; %d left out of each epoch "
                         "(a different %d each time)", len(index), self.train_kind, plan.batches_per_rank,
                         hp.batch_size, world, plan.remainder, plan.remainder)
        counter = SkipCounter("train", self._budget(per_worker * hp.batch_size))
        tag: Any = TagSkipped("train", counter)
        example: Any = TripletExample(self.image_transform, hp.train_text, seed=hp.seed, captions=self.captions)
        lengths = self.manifest["splits"]["train"].get("session_lengths") or {}
        if hp.train_on == "sessions" and world > 1 and len(lengths) > 1:
            # The contrastive loss gathers every rank's rows, and all_gather needs the same count on each.
            raise ValueError(f"data.init_args.train_on=sessions on {world} ranks: the train split's sessions have "
                             f"{sorted(map(int, lengths))} turns, so ranks would hold different row counts; train on "
                             "one device, or on sessions of one length")
        if hp.train_on == "sessions":
            # Sessions are collated as lists (``collate`` pads only ``*images`` fields, which a session
            # sample has none of) and flattened into turn rows by the last stage, in the worker.
            example, tag = SessionExample(self.image_transform, hp.train_text, seed=hp.seed), SessionRows(
                tag, self.captions)
        if hp.hard_negatives:
            # Read (and checked) here, in the main process: a bad sidecar fails before any worker starts.
            example = WithNegatives(example, self.image_transform, read_negatives(self.data_dir, "train",
                                                                                  hp.hard_negatives),
                                    GalleryReader(self.data_dir, "train"), hp.hard_negatives)
        epochs = TrainEpochs(shard_urls(self.data_dir, self.manifest, "train", self.train_kind), example,
                             hp.batch_size, per_worker, hp.shuffle_buffer, hp.bucket_batches, hp.seed, rank, counter,
                             tag, hp.sampling, reader, world, workers)
        stream = TrainStream(epochs)
        # Every worker may read every shard: the plan (or resampling) decides which samples it reads.
        loader = wds.WebLoader(stream, batch_size=None, num_workers=hp.num_workers)
        # The epoch's length, so the Trainer knows the run's number of steps (schedules need it).
        resumable = ResumableLoader(loader.with_length(length, silent=True), stream, self._train_progress)
        if self._resume_stream:
            resumable.load_state_dict(self._resume_stream)
        return resumable

    def state_dict(self) -> dict[str, Any]:
        # The stream's position, also here: Lightning hands a loader its state only when it counts
        # the saved epoch as unfinished, but a checkpoint written at the very end of an epoch needs
        # it too (the next epoch's iteration starts before Lightning advances its epoch).
        epoch, batches, _ = self._train_progress()
        return {"train_stream": {"epoch": epoch, "batches": batches}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_stream = state_dict.get("train_stream")

    def _train_progress(self) -> tuple[int, int, int | float]:
        """(epoch, batches of it the Trainer has processed, its ``limit_train_batches``): the
        position a checkpoint records. Not ``num_training_batches``: a resumed run iterates the
        loader before the Trainer sets that (it is still infinite then)."""
        trainer = self.trainer
        if not isinstance(trainer, L.Trainer):  # a loader used on its own (benchmarks, tools)
            return 0, 0, 1.0
        return (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                trainer.limit_train_batches)

    def _budget(self, samples: int) -> int:
        """One DataLoader worker's skip budget: its share of the stream at ``max_skip_rate``, at least
        one when the rate allows any (a worker with under 100 samples would otherwise stop at its first)."""
        rate = self.hparams.max_skip_rate
        return max(1 if rate > 0 and samples > 0 else 0, skip_budget(samples, rate))

    def _eval_pipeline(self, urls: list[str], name: str, example: Any, samples: int,
                       collation: Any = collate) -> wds.DataPipeline:
        rank, world = self._world()
        workers = max(1, min(self.hparams.num_workers, len(urls)))
        counter = SkipCounter(name, self._budget(math.ceil(samples / (world * workers))))
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=counter),
            SplitSamplesByRank(rank, world),
            wds.map(decode_sample, handler=counter),
            wds.map(KeyedStage(example), handler=counter),
            wds.batched(self.hparams.eval_batch_size, collation_fn=collation, partial=True),
            wds.map(TagSkipped(name, counter)),
        )

    def eval_dataloaders(self, split: str, sessions: bool = False) -> list[wds.WebLoader]:
        """The gallery (0) and the queries (1) of ``split``; with ``sessions`` its sessions (2)."""
        gallery = shard_urls(self.data_dir, self.manifest, split, "gallery")
        queries = shard_urls(self.data_dir, self.manifest, split, "triplets")
        counts = self.manifest["splits"][split]
        extra = []
        if sessions:
            self.require_sessions(split, "eval_sessions")
            urls = shard_urls(self.data_dir, self.manifest, split, SESSION_KIND)
            extra.append(self._loader(self._eval_pipeline(urls, f"{split}-sessions",
                                                          SessionExample(self.image_transform, "short"),
                                                          counts.get("sessions", 0), collate_session_rows),
                                      len(urls)))
        return [
            self._loader(self._eval_pipeline(gallery, f"{split}-gallery",
                                             GalleryExample(self.image_transform, self.captions),
                                             counts.get("products", 0)), len(gallery)),
            self._loader(self._eval_pipeline(queries, f"{split}-queries",
                                             TripletExample(self.image_transform, "short", captions=self.captions,
                                                            query_views=self.hparams.query_views),
                                             counts.get("triplets", 0)),
                         len(queries)),
            *extra,
        ]

    def val_dataloader(self) -> list[wds.WebLoader]:
        return self.eval_dataloaders(self.hparams.val_split, self.hparams.eval_sessions)

    @property
    def test_split(self) -> str:
        return self.hparams.test_split or self.hparams.val_split

    @property
    def predict_split(self) -> str:
        return self.hparams.predict_split or self.test_split

    def test_dataloader(self) -> list[wds.WebLoader]:
        return self.eval_dataloaders(self.test_split, self.hparams.eval_sessions)

    def predict_dataloader(self) -> list[wds.WebLoader]:
        return self.eval_dataloaders(self.predict_split)

    def split_of(self, trainer_fn: str) -> str:
        return {"validate": self.hparams.val_split, "fit": self.hparams.val_split, "test": self.test_split,
                "predict": self.predict_split}.get(trainer_fn, self.hparams.val_split)


    # -- reading a few samples back (pictures, examples) ---------------------------------------------
    def example_queries(self, split: str, n: int) -> list[dict[str, Any]]:
        """The first ``n`` query samples of ``split`` in shard order (the same ones every time)."""
        urls = shard_urls(self.data_dir, self.manifest, split, "triplets")
        out = []
        for sample in iterate_shards(urls, handler=SkipCounter(f"{split}-examples")):
            out.append(sample)
            if len(out) >= n:
                break
        return out

    def gallery_products(self, split: str, wanted: set[int]) -> dict[int, dict[str, Any]]:
        """Decoded gallery samples of ``split`` whose ``stable_id(product_id)`` is in ``wanted``."""
        urls = shard_urls(self.data_dir, self.manifest, split, "gallery")
        found: dict[int, dict[str, Any]] = {}
        for sample in iterate_shards(urls, handler=SkipCounter(f"{split}-gallery-lookup")):
            key = stable_id(sample["json"]["product_id"])
            if key in wanted:
                found[key] = sample
                if len(found) == len(wanted):
                    break
        return found
