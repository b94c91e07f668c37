"""The generated dataset as a DataModule: a ``ShardDataModule`` whose folder is written on first use."""

from __future__ import annotations

import logging
from typing import Any

from .datamodule import ShardDataModule
from .shards import read_manifest
from .synthetic import GENERATOR_VERSION, write_synthetic

log = logging.getLogger(__name__)


def _sessions_setting(count: int, turns: tuple[int, int] | list[int]) -> dict[str, int] | None:
    """The manifest's ``source.sessions`` for these settings (``write_synthetic`` writes none for 0)."""
    return {"count": count, "min_turns": turns[0], "max_turns": turns[1]} if count else None


def _folder_sessions(source: dict[str, Any]) -> dict[str, int] | str | None:
    """The folder's sessions as ``_sessions_setting`` writes them, or ``"chained"`` for sessions that
    ``cir data sessions`` chained from the triplets after generation (it replaces ``source.sessions``)."""
    sessions = source.get("sessions")
    if not sessions:
        return None
    if sessions.get("chained") or sessions.get("chained_from"):
        return "chained"
    return {k: sessions.get(k) for k in ("count", "min_turns", "max_turns")}


def _describe(sessions: dict[str, int] | str | None) -> str:
    if sessions == "chained":
        return "chained from its triplets"
    return "none" if not sessions else f"{sessions['count']} of {sessions['min_turns']}-{sessions['max_turns']} turns"


def _session_flags(folder: dict[str, int] | str | None, asked: int) -> str:
    """The flags that match the folder's sessions (a chained folder's triplets train with sessions=0)."""
    if isinstance(folder, dict):
        return (f" --data.init_args.sessions={folder['count']} "
                f"--data.init_args.session_turns=[{folder['min_turns']},{folder['max_turns']}]")
    return " --data.init_args.sessions=0" if asked else ""


class SyntheticDataModule(ShardDataModule):
    """The generated multi-view dataset; ``prepare_data`` writes its shards when they are missing, and
    refuses a folder written with other settings or by another version of the generator
    (``synthetic.GENERATOR_VERSION``: version 4 added the query groups and view-incomplete queries).

    Args:
        products: products to generate (train and val together).
        generator_seed: seed of the generator (the data itself, not the loader order).
        val_fraction: share of product families held out for validation.
        sessions: multi-turn sessions generated beside the triplets (val gets ``val_fraction`` of them;
            ``synthetic.sessions``); 0 writes the single-turn data only, exactly as before.
        session_turns: the fewest and most turns of a generated session (2 <= min <= max <= 5).
    """

    def __init__(self, data_dir: str = "data/synthetic", products: int = 1500, generator_seed: int = 0,
                 val_fraction: float = 0.2, sessions: int = 0, session_turns: tuple[int, int] = (2, 5),
                 **kwargs: Any) -> None:
        super().__init__(data_dir=data_dir, **kwargs)
        if sessions < 0:
            raise ValueError(f"data.init_args: sessions={sessions}: must be 0 (none) or more")
        # One hparams dict with the loader's and the generator's settings (logged, checkpointed).
        self.save_hyperparameters({**self.hparams, "products": products, "generator_seed": generator_seed,
                                   "val_fraction": val_fraction, "sessions": sessions,
                                   "session_turns": list(session_turns)})

    def prepare_data(self) -> None:
        hp = self.hparams
        manifest = self.data_dir / "manifest.json"
        if manifest.is_file():
            source = read_manifest(self.data_dir)["source"]
            wanted = (hp.products, hp.generator_seed, hp.val_fraction,
                      _sessions_setting(hp.sessions, hp.session_turns), GENERATOR_VERSION)
            found = (source.get("products"), source.get("seed"), source.get("val_fraction"), _folder_sessions(source),
                     source.get("version"))
            if found[3] == "chained" and wanted[3] is None:  # the generator's triplets, sessions added later
                found = (*found[:3], None, found[4])
            if found != wanted:
                keys = ("products", "generator_seed", "val_fraction")
                differ = [f"{k}: folder {f}, config {w}"
                          for k, f, w in zip(keys, found, wanted, strict=False) if f != w]
                if found[3] != wanted[3]:
                    differ.append(f"sessions: folder {_describe(found[3])}, config {_describe(wanted[3])}")
                if found[4] != GENERATOR_VERSION:
                    differ.append(f"generator version: folder {found[4]}, this code {GENERATOR_VERSION}")
                same_settings = found[:4] == wanted[:4]  # only the generator changed: flags cannot help
                flags = ("" if same_settings else
                         f"or pass --data.init_args.products={found[0]} --data.init_args.generator_seed={found[1]} "
                         f"--data.init_args.val_fraction={found[2]}{_session_flags(found[3], hp.sessions)}; ")
                raise ValueError(
                    f"{self.data_dir} holds generated data made with other settings ({'; '.join(differ)}). To train "
                    "on that folder as it is, use class_path datamodules.ShardDataModule with "
                    f"data_dir={self.data_dir}; {flags}or delete {self.data_dir} to regenerate."
                )
            return
        log.info("generating %d synthetic products%s into %s", hp.products,
                 f" and {hp.sessions} sessions" if hp.sessions else "", self.data_dir)
        write_synthetic(self.data_dir, products=hp.products, seed=hp.generator_seed, val_fraction=hp.val_fraction,
                        sessions=hp.sessions, session_turns=(hp.session_turns[0], hp.session_turns[1]))
