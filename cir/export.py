"""``cir export``: a LoRA run's checkpoint with its adapters merged into the weights.

    cir export --config experiments/scale/procir_lora.yaml --ckpt outputs/scale/procir_lora/checkpoints/last.ckpt \\
        --out outputs/scale/procir_lora/merged.ckpt [-- --data.init_args.data_dir=...]

The model is built from the experiment (with its ``model.init_args.lora``), the checkpoint loaded,
every adapter folded into its layer's weight, and the result saved with the keys of the model
without LoRA: ``lightning validate --ckpt_path``, ``init_checkpoint``, ``cir search`` and ``cir query``
load it with an experiment whose ``lora`` is unset. Optimizer states are dropped (no resuming).
"""

from __future__ import annotations

from .args import command_parser, parse
from .errors import check_files, user_errors
from .models import export_merged


def main(argv: list[str] | None = None) -> None:
    p = command_parser("export", __doc__)
    p.add_argument("--config", action="append", required=True, help="experiment YAML of the LoRA run (repeatable)")
    p.add_argument("--ckpt", required=True, help="the LoRA run's checkpoint (its last.ckpt)")
    p.add_argument("--out", required=True, help="file the merged checkpoint is written to")
    args, extra = parse(p, argv, passthrough=True)
    with user_errors("cir export"):
        check_files("cir export", [("--config", c) for c in args.config] + [("--ckpt", args.ckpt)])
        merged = export_merged(args.config, args.ckpt, args.out, extra)
    print(f"merged the adapters of {merged} layers into {args.out}")
