"""``cir``: one command for everything the framework does (``python -m cir`` works the same way).

    cir fit|validate|test|predict --config EXP   the LightningCLI (the same as ``lightning``)
    cir data ...      shard folders from the generator or the real datasets
    cir caption ...   MLLM captions of a shard folder (LLaVA-caption CIR)
    cir build ...     CIR training data from a catalogue of photos (the FashionMV pipeline)
    cir search ...    saved faiss gallery indexes: build, query
    cir query ...     interactive queries (KV-cached for ProCIR's two-stage dialogue)
    cir serve ...     a trained model as an HTTP service with a web page over its gallery
    cir mine-negatives ...  offline hard negatives for training, mined with a trained model
    cir sweep ...     Optuna sweeps over any config key
    cir compare ...   MLflow runs as an ablation table
    cir export ...    a LoRA run's checkpoint with the adapters merged into the weights

``cir <command> --help`` explains each. The older hyphenated scripts (cir-data, cir-caption,
cir-search, cir-query, cir-sweep, cir-compare) remain as aliases for this release.
"""

from __future__ import annotations

import difflib
import importlib
import sys

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_CLI = "cir.lightning_cli"
# Subcommand → module with a ``main(argv)``; imported only when run, so ``cir data`` never loads a model.
COMMANDS = {
    "data": "cir.data",
    "caption": "cir.caption",
    "build": "cir.build",
    "search": "cir.search",
    "query": "cir.query",
    "serve": "cir.serve.command",
    "sweep": "cir.sweep",
    "compare": "cir.compare",
    "export": "cir.export",
    "mine-negatives": "cir.mine",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    if command in TRAINER_COMMANDS:
        importlib.import_module(LIGHTNING_CLI).main(argv)
        return
    if command not in COMMANDS:
        known = [*TRAINER_COMMANDS, *COMMANDS]
        close = difflib.get_close_matches(command, known, n=1)
        hint = f" (did you mean 'cir {close[0]}'?)" if close else ""
        raise SystemExit(f"cir: unknown command {command!r}{hint}; the commands are {', '.join(known)}")
    sys.argv[0] = f"cir {command}"
    importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    main()
