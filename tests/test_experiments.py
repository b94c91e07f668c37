"""End-to-end: every experiment YAML runs, training from a saved backbone folder, MLflow records."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_modules.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").rglob("*.yaml"))


def _tiny_data_args(data_dir: Path) -> list[str]:
    return [f"--data.init_args.data_dir={data_dir}", "--data.init_args.num_workers=0", "--data.init_args.products=200",
            "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=16"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("exp-data")
    write_synthetic(out, products=200, seed=0, val_fraction=0.2, maxcount=64)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_experiment_fast_dev_run(experiment: Path, tiny_data: Path, tmp_path: Path) -> None:
    build_cli(["fit", "--config", str(experiment), "--trainer.fast_dev_run=2",
               f"--trainer.default_root_dir={tmp_path}", *_tiny_data_args(tiny_data)])


@pytest.mark.slow
def test_train_from_a_saved_backbone_folder_and_log_to_mlflow(tiny_data: Path, tmp_path: Path) -> None:
    import mlflow

    from lightning_modules.backbones import CLIPBackbone

    CLIPBackbone("tiny").save_pretrained(tmp_path / "tiny-clip")
    cli = build_cli([
        "fit", "--config", str(ROOT / "experiments/demo.yaml"),
        f"--model.init_args.backbone.init_args.name_or_path={tmp_path / 'tiny-clip'}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", f"--trainer.default_root_dir={tmp_path}",
        *_tiny_data_args(tiny_data),
    ])
    assert cli.model.backbone.name_or_path == str(tmp_path / "tiny-clip")
    logger = cli.trainer.logger
    client = mlflow.MlflowClient(logger._tracking_uri)
    run = client.get_run(logger.run_id)
    assert run.data.params["backbone/init_args/name_or_path"] == str(tmp_path / "tiny-clip")
    assert run.data.params["batch_size"] == "8"
    assert 0.0 <= run.data.metrics["val/recall_at_10"] <= 1.0
    assert "val/synth_studio/recall_at_10" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(logger.run_id)}
    assert "config.yaml" in artifacts
    config = Path(client.download_artifacts(logger.run_id, "config.yaml", str(tmp_path))).read_text()
    assert str(tmp_path / "tiny-clip") in config and "class_path: lightning_modules.CLIP4CIR" in config
    assert (Path(cli.trainer.checkpoint_callback.last_model_path)).is_file()

    # The same checkpoint through `validate` reproduces the logged recall; `predict` embeds the gallery.
    last = cli.trainer.checkpoint_callback.last_model_path
    common = ["--config", str(ROOT / "experiments/demo.yaml"),
              f"--model.init_args.backbone.init_args.name_or_path={tmp_path / 'tiny-clip'}",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", *_tiny_data_args(tiny_data)]
    val = build_cli(["validate", *common, f"--ckpt_path={last}"])
    assert float(val.trainer.callback_metrics["val/recall_at_10"]) == pytest.approx(
        run.data.metrics["val/recall_at_10"], abs=1e-6)
    pred = build_cli(common, run=False)
    outputs = pred.trainer.predict(pred.model, datamodule=pred.datamodule, ckpt_path=last)
    gallery = [p for batch in outputs[0] for p in batch["product_id"]]
    assert len(gallery) == len(set(gallery)) and outputs[0][0]["embedding"].shape[1] == cli.model.backbone.dim
