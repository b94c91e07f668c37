"""Where MLflow runs are tracked: one rule for the logger, ``cir compare`` and ``cir sweep``, in a
module that imports neither Lightning nor MLflow (``cir compare`` starts without them)."""

from __future__ import annotations

import os

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the project's SQLite file."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
