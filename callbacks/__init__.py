"""Lightning callbacks and logging glue of fashion-cir."""

from .data_health import SkippedSamplesLogger
from .metrics_table import MetricsTable
from .mlflow_logging import DEFAULT_TRACKING_URI, LogConfigToMLflow, MLflowLogger

__all__ = ["DEFAULT_TRACKING_URI", "LogConfigToMLflow", "MLflowLogger", "MetricsTable", "SkippedSamplesLogger"]
