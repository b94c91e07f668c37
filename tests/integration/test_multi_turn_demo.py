"""The multi-turn demo (experiments/demos/multi_turn.yaml) at a reduced size: ProCIR trained on the
generator's own sessions (2-5 turns), evaluated per turn beside each turn's text-blind line and chance.

Measured on the 2-core CPU machine over three seeds (data, loader and training seed 0, 1, 2;
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
PRODUCTS, SESSIONS, EPOCHS = 500, 250, 3  # the demo's 1,500 products, 740 sessions and 6 epochs, reduced
KS = (1, 5, 10)


def run_demo(root: Path, seed: int, products: int = PRODUCTS, sessions: int = SESSIONS,
             epochs: int = EPOCHS) -> dict[str, float]:
    """``lightning fit`` of the demo, its data generated into ``root``; the final callback metrics."""
    root.mkdir(parents=True, exist_ok=True)
    cli = build_cli(["fit", "--config", str(DEMO), f"--seed_everything={seed}",
                     f"--data.init_args.data_dir={root / 'data'}", f"--data.init_args.products={products}",
                     f"--data.init_args.sessions={sessions}", f"--data.init_args.generator_seed={seed}",
                     f"--data.init_args.seed={seed}", f"--model.init_args.seed={seed}",
                     "--data.init_args.num_workers=0", f"--trainer.max_epochs={epochs}",
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
    # Seeds 0/1/2 at this size (500 products, 250 sessions of 2-5 turns: 200 train, 50 val; 3 epochs of 25
    # steps of 8 sessions; on the 2-core machine 57 s alone, 5.3 min each with five other runs at once):
    #   turn 1 (50 queries)    R@1 0.100/0.100/0.080 vs text-blind 0.140/0.160/0.180;
    #                          R@10 0.660/0.760/0.680 vs 0.700/0.760/0.620
    #   turn 2 (50)            R@1 0.100/0.100/0.060 vs 0.080/0.080/0.060; R@10 0.540/0.620/0.500 vs 0.620/0.620/0.540
    #   turn 3 (37/38/43)      R@1 0.027/0.132/0.047 vs 0.054/0.105/0.256; R@10 0.459/0.500/0.558 vs 0.676/0.500/0.698
    #   turn 4 (26/27/28)      R@1 0.077/0.037/0.071 vs 0.115/0.000/0.071; R@10 0.423/0.407/0.464 vs 0.385/0.519/0.321
    #   turn 5 (11/19/10)      R@10 0.091/0.368/0.500 vs 0.455/0.579/0.600
    #   chance (reference removed) R@5 0.029-0.031, R@10 0.057-0.063.
    # Per-turn R@K is above its text-blind line on some seeds and turns and below on others: not asserted
    # (the text-blind line is strong on this data, see docs/benchmarks). What holds with a wide margin:
    # turns 1-4 far above chance (R@5 >= 0.222 and R@10 >= 0.407 measured, 7x chance; asserted 3x).
    # Turn 5 has 10-19 queries (R@10 0.091 on seed 0): only logged.
    metrics = run_demo(tmp_path / "run", SEED)
    turns = turn_lines(metrics)
    print({t: {k: round(v, 3) for k, v in line.items()} for t, line in turns.items()})
    assert sorted(turns) == [1, 2, 3, 4, 5]  # generated sessions of 2-5 turns: every turn has val queries
    assert [turns[t]["queries"] for t in range(1, 6)] == sorted((turns[t]["queries"] for t in range(1, 6)),
                                                                reverse=True)  # a session reaching t has t-1
    for line in turns.values():
        assert all(math.isfinite(line[f"recall_at_{k}"]) and 0 <= line[f"recall_at_{k}"] <= 1 for k in KS)
        assert all(math.isfinite(line[f"text_blind/recall_at_{k}"]) for k in KS)
    assert turns[1]["queries"] == turns[2]["queries"] == math.ceil(0.2 * SESSIONS)  # val_fraction of them
    for t in (1, 2, 3, 4):
        assert turns[t]["recall_at_5"] > 3 * turns[t]["chance/recall_at_5"], t
        assert turns[t]["recall_at_10"] > 3 * turns[t]["chance/recall_at_10"], t
    # The single-turn evaluation still runs beside the sessions.
    assert math.isfinite(metrics["val/recall_at_1"]) and "val/text_blind/recall_at_1" in metrics
