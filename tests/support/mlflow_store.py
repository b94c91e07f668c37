"""Hand-made MLflow stores for the tests of ``cir compare``."""

from __future__ import annotations

from pathlib import Path

import mlflow


def store(uri: str, tmp_path: Path, runs: list[tuple[dict[str, str], dict[str, float]]]) -> str:
    """An experiment named after ``tmp_path`` in the store at ``uri``, one finished run per
    (tags, metrics); returns the experiment's name."""
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(tmp_path.name, artifact_location=str(tmp_path / "artifacts"))
    for tags, metrics in runs:
        run = client.create_run(exp, tags=tags)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    return tmp_path.name
