"""Lightning callbacks and logging glue of fashion-cir."""

from .best_checkpoint import BestCheckpoint
from .cot_schedule import CoTSchedule
from .data_health import SkippedSamplesLogger
from .embedding_writer import EmbeddingWriter
from .eval_artifacts import EvalArtifacts
from .metrics_table import MetricsTable
from .mlflow_logging import DEFAULT_TRACKING_URI, LogConfigToMLflow, MLflowLogger
from .run_tags import RunTags
from .speedups import Speedups
from .stage_switch import StageSwitch
from .submission import RetrievalSubmission

__all__ = ["DEFAULT_TRACKING_URI", "BestCheckpoint", "CoTSchedule", "EmbeddingWriter", "EvalArtifacts",
           "LogConfigToMLflow", "MLflowLogger", "MetricsTable", "RetrievalSubmission", "RunTags",
           "SkippedSamplesLogger",
           "Speedups", "StageSwitch"]
