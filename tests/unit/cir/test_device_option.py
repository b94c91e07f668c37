"""--device on the commands that embed with a model: CUDA asked for on a machine without it ends
the command in one line, before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cir.index import main as cir_index
from cir.query import main as cir_query
from cir.search import main as cir_search

DEMO = str(Path(__file__).resolve().parents[3] / "experiments/demos/clip4cir.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "shop" / "images" / "p1").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "shop" / "images" / "p1" / "0.png")
    calls = [
        (cir_search, ["build", "--config", DEMO, "--untrained", "--out", str(tmp_path / "i"), "--device", "cuda"]),
        (cir_query, ["--config", DEMO, "--untrained", "--images", str(image), "--text", "red", "--device", "cuda"]),
        (cir_index, ["--config", DEMO, "--untrained", "--catalogue", str(tmp_path / "shop"), "--out",
                     str(tmp_path / "o"), "--device", "cuda"]),
    ]
    for command, argv in calls:
        with pytest.raises(SystemExit) as stopped:
            command(argv)
        message = str(stopped.value.code)
        assert "--device cuda: this machine has no CUDA device" in message and len(message.splitlines()) == 1, message
