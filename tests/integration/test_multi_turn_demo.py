"""The multi-turn demo (experiments/demos/multi_turn.yaml) at a reduced size: ProCIR trained on
sessions chained from generated triplets, evaluated per turn beside each turn's text-blind line.

Measured on the 2-core CPU machine over three seeds (data, chaining and training seed 0, 1, 2;
``CIR_MULTI_TURN_SEED``), written beside the assertions; CI runs seed 0.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from cir.lightning_cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments/demos/multi_turn.yaml"
SEED = int(os.environ.get("CIR_MULTI_TURN_SEED", "0"))
EPOCHS = 3  # the demo's 6, halved
KS = (1, 5, 10)


def prepare_data(data_dir: Path, seed: int, products: int = 1500) -> Path:
    """The demo's data: generated products and triplets, sessions chained from them. The one step to
    swap for ``cir data synthetic --sessions`` once the generator writes sessions."""
    from datamodules.chained_sessions import add_chained_sessions
    from datamodules.synthetic import write_synthetic

    write_synthetic(data_dir, products=products, seed=seed)
    add_chained_sessions(data_dir, ("train", "val"), seed=seed)
    return data_dir


def run_demo(data_dir: Path, root: Path, seed: int, epochs: int = EPOCHS, products: int = 1500) -> dict[str, float]:
    """``lightning fit`` of the demo on ``data_dir``; the final callback metrics."""
    root.mkdir(parents=True, exist_ok=True)
    cli = build_cli(["fit", "--config", str(DEMO), f"--seed_everything={seed}",
                     f"--data.init_args.data_dir={data_dir}", f"--data.init_args.products={products}",
                     f"--data.init_args.generator_seed={seed}", f"--data.init_args.session_seed={seed}",
                     f"--model.init_args.seed={seed}", f"--data.init_args.seed={seed}",
                     f"--trainer.max_epochs={epochs}",
                     f"--trainer.default_root_dir={root}",
                     f"--trainer.logger.init_args.tracking_uri=sqlite:///{root / 'mlflow.db'}"])
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def turn_lines(metrics: dict[str, float]) -> dict[int, dict[str, float]]:
    """Turn (1-based) → its R@K, text-blind R@K, chance R@K and query count."""
    turns = sorted({int(k.split("/")[1].removeprefix("turn_")) for k in metrics if k.startswith("val/turn_")})
    out = {}
    for t in turns:
        line = {"queries": metrics[f"val/turn_{t}/queries"]}
        for k in KS:
            for name in ("recall_at", "text_blind/recall_at", "chance/recall_at"):
                line[f"{name}_{k}"] = metrics[f"val/turn_{t}/{name}_{k}"]
        out[t] = line
    return out


@pytest.mark.slow
def test_multi_turn_demo_logs_every_turn_and_ranks_far_above_chance(tmp_path: Path) -> None:
    # Seeds 0/1/2 (1,500 products; 376/382/371 train sessions, 96/92/100 val sessions, all of 2 turns;
    # 3 epochs of 23-24 steps; 26-30 min each on the 2-core machine under other jobs' load):
    #   turn 1 R@1  0.042/0.098/0.030 vs text-blind 0.104/0.054/0.000; R@10 0.469/0.522/0.460 vs 0.458/0.565/0.360
    #   turn 2 R@1  0.021/0.076/0.060 vs text-blind 0.073/0.120/0.070; R@10 0.396/0.554/0.460 vs 0.365/0.500/0.410
    #   chance R@1 0.007, R@5 0.033-0.034, R@10 0.067-0.068 (each turn's reference removed).
    # Turn-level R@K is above its text-blind line on some seeds and below on others, at every K: not
    # asserted (these short runs train on the 752 chained turns only, a third of the triplets). What
    # holds with a wide margin: every turn far above chance (R@5 >= 0.25, 7x; R@10 >= 0.40, 5.8x).
    data = prepare_data(tmp_path / "data", SEED)
    metrics = run_demo(data, tmp_path / "run", SEED)
    turns = turn_lines(metrics)
    print({t: {k: round(v, 3) for k, v in line.items()} for t, line in turns.items()})
    assert sorted(turns) == [1, 2]  # sessions chained from generated triplets have two turns
    for line in turns.values():
        assert line["queries"] > 50
        assert all(math.isfinite(line[f"recall_at_{k}"]) and 0 <= line[f"recall_at_{k}"] <= 1 for k in KS)
        assert all(math.isfinite(line[f"text_blind/recall_at_{k}"]) for k in KS)
        assert line["recall_at_5"] > 3 * line["chance/recall_at_5"]
        assert line["recall_at_10"] > 3 * line["chance/recall_at_10"]
    # The single-turn evaluation still runs beside the sessions.
    assert math.isfinite(metrics["val/recall_at_1"]) and "val/text_blind/recall_at_1" in metrics
