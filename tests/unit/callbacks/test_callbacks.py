"""The callbacks: MLflow tracking URI, the metrics table, the CoT schedule, the stage switch's
checks, and the retrieval picture."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from callbacks.cot_schedule import CoTSchedule, keep_ratio
from callbacks.eval_artifacts import retrieval_picture
from callbacks.metrics_table import format_table
from callbacks.stage_switch import StageSwitch
from callbacks.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri
from lightning_modules.families.procir import CoTRatioSchedule


def test_tracking_uri_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert resolve_tracking_uri() == "sqlite:///elsewhere.db"
    assert resolve_tracking_uri("http://server:5000") == "http://server:5000"


def test_metrics_table_reports_text_blind_and_chance() -> None:
    metrics = {"val/recall_at_10": 0.5, "val/a/recall_at_10": 0.6, "val/a/gallery_size": 100.0,
               "val/a/queries": 30.0, "val/b/recall_at_10": 0.4, "val/b/gallery_size": 50.0,
               "val/b/queries": 10.0, "val/a/text_blind/recall_at_10": 0.25, "val/text_blind/recall_at_10": 0.3,
               "val/b/chance/recall_at_10": 10 / 49, "val/text_blind/recall_at_5": 0.1,
               "val/recall_subset_at_1": 0.7}
    table = format_table(metrics)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:] if line and line[0] != "("}
    # a: K / gallery; b: the logged chance line (its source removed); all: query-weighted K / gallery
    assert float(rows["a"][4]) == pytest.approx(0.1) and float(rows["b"][4]) == pytest.approx(10 / 49, abs=1e-4)
    assert float(rows["all"][4]) == pytest.approx((30 * 0.1 + 10 * 0.2) / 40)
    assert float(rows["a"][3]) == 0.25 and float(rows["a"][5]) == pytest.approx(0.35)
    assert float(rows["all"][5]) == pytest.approx(0.2)
    assert "text_blind" not in rows and "recall_subset_at_1" in rows  # a reference line is not a dataset


def test_cot_keep_ratio_schedule() -> None:
    total = 100
    assert [keep_ratio(t, total) for t in (0, 25, 50, 75, 100)] == [1.0, 0.5, 0.0, 0.0, 0.0]
    cb, module = CoTSchedule(), SimpleNamespace(cot_keep_ratio=1.0)
    for step, expected in ((0, 1.0), (25, 0.5), (50, 0.0)):
        cb.on_train_batch_start(SimpleNamespace(global_step=step, estimated_stepping_batches=total), module, None, 0)
        assert module.cot_keep_ratio == expected


def test_the_cot_schedule_is_what_procir_looks_for() -> None:
    """ProCIR finds the callback through its declared interface, not by its class."""
    assert isinstance(CoTSchedule(), CoTRatioSchedule)
    assert CoTSchedule(removal_fraction=0.25).keep_ratio_at(10, 100) == pytest.approx(0.6)


def test_the_stage_switch_refuses_a_model_without_two_stages() -> None:
    trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(TypeError, match="needs a two-stage model; ProCIRSFT"):
        StageSwitch().setup(trainer, type("ProCIRSFT", (), {})(), "fit")


def test_the_retrieval_picture_sets_its_text_large() -> None:
    """The modification text must be readable where MLflow shows the PNG: its lines are as tall as
    the requested font (the old picture used PIL's 11-pixel bitmap font)."""
    rows = [{"source": [Image.new("RGB", (30, 40), (200, 0, 0))] * 2, "text": "make it red with an open back",
             "results": [(Image.new("RGB", (30, 40), (0, 0, 200)), i == 1) for i in range(5)]}]
    small = retrieval_picture(rows, font_size=12)
    large = retrieval_picture(rows, font_size=28)
    assert large.height - small.height == 28 - 12  # one line of text, each a font size plus spacing

    def ink_rows(img: Image.Image) -> int:  # text rows below the thumbnails
        below = img.crop((0, 96 + 8, img.width, img.height)).convert("L")
        return sum(1 for y in range(below.height) if min(below.getpixel((x, y)) for x in range(below.width)) < 128)
    assert ink_rows(large) >= 16 and ink_rows(large) > ink_rows(small)
