"""Lightning callbacks and logging glue of fashion-cir."""

from __future__ import annotations

from typing import TYPE_CHECKING

from datamodules.lazy import lazy_namespace

if TYPE_CHECKING:
    from .best_checkpoint import BestCheckpoint
    from .cot_schedule import CoTSchedule
    from .data_health import SkippedSamplesLogger
    from .embedding_writer import EmbeddingWriter
    from .eval_artifacts import EvalArtifacts
    from .metrics_table import MetricsTable
    from .mlflow_logging import LogConfigToMLflow, MLflowLogger
    from .run_tags import RunTags
    from .speedups import Speedups
    from .stage_switch import StageSwitch
    from .submission import RetrievalSubmission
    from .tracking import DEFAULT_TRACKING_URI

_EXPORTS = {
    "BestCheckpoint": ".best_checkpoint",
    "CoTSchedule": ".cot_schedule",
    "DEFAULT_TRACKING_URI": ".tracking",
    "EmbeddingWriter": ".embedding_writer",
    "EvalArtifacts": ".eval_artifacts",
    "LogConfigToMLflow": ".mlflow_logging",
    "MLflowLogger": ".mlflow_logging",
    "MetricsTable": ".metrics_table",
    "RetrievalSubmission": ".submission",
    "RunTags": ".run_tags",
    "SkippedSamplesLogger": ".data_health",
    "Speedups": ".speedups",
    "StageSwitch": ".stage_switch",
}
__all__ = ["BestCheckpoint", "CoTSchedule", "DEFAULT_TRACKING_URI", "EmbeddingWriter", "EvalArtifacts",
           "LogConfigToMLflow", "MLflowLogger", "MetricsTable", "RetrievalSubmission", "RunTags",
           "SkippedSamplesLogger", "Speedups", "StageSwitch"]
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
