"""End-to-end: every experiment YAML runs, training from a saved backbone folder, MLflow records,
real-dataset experiments on the generated data converted from the real layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from cir.lightning_cli import build_cli, expand_defaults
from lightning_modules.retrieval.metric_names import REFERENCE_LINES

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "sweeps" not in p.parts)
SMALL_LOADER = ["--data.init_args.num_workers=0", "--data.init_args.batch_size=8",
                "--data.init_args.eval_batch_size=16"]
VALIDATED_BASELINES: set[tuple[str, str | None, str]] = set()
# Multimodal-LLM runs check wiring, and every dialogue costs a forward of the tiny LLM: smaller batches.
SMALL_MLLM_LOADER = ["--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=8"]


def merged_config(experiment: Path) -> dict:
    """The experiment's YAML merged over its defaults (top-level data/model keys are enough here)."""
    argv = expand_defaults(["--config", str(experiment)])
    merged: dict = {}
    for f in (argv[i + 1] for i, a in enumerate(argv) if a == "--config"):
        for key, value in (yaml.safe_load(Path(f).read_text()) or {}).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value, "init_args": {**merged[key].get("init_args", {}),
                                                                       **value.get("init_args", {})}}
            else:
                merged[key] = value
    return merged


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated data as shards, and converted from the FashionIQ and FashionMV layouts."""
    from datamodules.converters import convert_fashioniq, convert_fashionmv
    from datamodules.synthetic import generate, write_synthetic
    from datamodules.synthetic.layouts import write_fashioniq_layout, write_fashionmv_layout

    base = tmp_path_factory.mktemp("exp-data")
    write_synthetic(base / "synthetic", products=200, seed=0, val_fraction=0.2, maxcount=64)
    data = generate(240, seed=1)
    write_fashioniq_layout(base / "fiq-layout", data)
    convert_fashioniq(base / "fiq-layout", base / "fashioniq", maxcount=64)
    write_fashionmv_layout(base / "fmv-layout", data)
    convert_fashionmv(base / "fmv-layout", base / "fashionmv", maxcount=64)
    return {"synthetic": base / "synthetic", "fashioniq": base / "fashioniq", "fashionmv": base / "fashionmv"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightning_modules.backbones import CLIPBackbone

    folder = tmp_path_factory.mktemp("backbones") / "tiny-clip"
    CLIPBackbone("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3.5 saved to a folder: what the experiments' real hub ids are replaced by."""
    from lightning_modules.backbones import QwenBackbone

    folder = tmp_path_factory.mktemp("backbones") / "tiny-qwen"
    QwenBackbone("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def embedder_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Qwen3-VL and Qwen2-VL embedders saved to folders: what the baselines' hub ids become."""
    from lightning_modules.backbones import VLEmbedderBackbone

    base = tmp_path_factory.mktemp("embedders")
    for family in ("qwen3-vl-embedding", "gme"):
        VLEmbedderBackbone("tiny", family=family).save_pretrained(base / family)
    return {family: base / family for family in ("qwen3-vl-embedding", "gme")}


@pytest.fixture(scope="module")
def sft_checkpoint(datasets, qwen_folder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ProCIR's SFT stage, as experiments/procir/sft_stage.yaml runs it, on the saved tiny Qwen."""
    root = tmp_path_factory.mktemp("sft")
    exp = ROOT / "experiments/procir/sft_stage.yaml"
    cli = build_cli(["fit", "--config", str(exp), *data_args(exp, datasets, qwen_folder=qwen_folder),
                     "--config", str(ROOT / "configs/model/procir/sft_tiny.yaml"),
                     f"--model.init_args.backbone.init_args.name_or_path={qwen_folder}",
                     "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.accumulate_grad_batches=1",
                     "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={root}"])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


@pytest.fixture(scope="module")
def stage1_checkpoint(datasets, tiny_folder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP4CIR checkpoint on the saved tiny backbone, as clip4cir_stage1.yaml would write."""
    root = tmp_path_factory.mktemp("stage1")
    cli = build_cli(["fit", "--config", str(DEMO), *SMALL_LOADER,
                     f"--data.init_args.data_dir={datasets['synthetic']}", "--data.init_args.products=200",
                     f"--model.init_args.backbone.init_args.name_or_path={tiny_folder}",
                     "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                     f"--trainer.default_root_dir={root}"])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BLIP-2 saved to a folder: what SPRC's and LLaVA-caption's real BLIP-2 is replaced by."""
    from lightning_modules.backbones import Blip2Backbone

    folder = tmp_path_factory.mktemp("backbones") / "tiny-blip2"
    Blip2Backbone("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sprc_checkpoint(datasets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SPRC stage-1 checkpoint of the tiny BLIP-2 (the saved folder's architecture), for sprc/stage2.yaml."""
    root = tmp_path_factory.mktemp("sprc-stage1")
    demo = ROOT / "experiments/demos/sprc_demo.yaml"
    cli = build_cli(["fit", "--config", str(demo), *data_args(demo, datasets), "--trainer.max_epochs=1",
                     "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                     f"--trainer.default_root_dir={root}"])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def data_args(experiment: Path, datasets: dict[str, Path], tiny_folder: Path | None = None,
              checkpoint: Path | None = None, qwen_folder: Path | None = None, sft: Path | None = None,
              embedders: dict[str, Path] | None = None, blip2_folder: Path | None = None) -> list[str]:
    """Point an experiment at test data, its real backbone at a saved tiny one (no downloads), its
    stage-1 or SFT checkpoint at a tiny one, and its caption sidecar at one the oracle captioner
    writes; GPU settings (bf16-mixed) become CPU float32."""
    config = merged_config(experiment)
    data, model = config["data"], config["model"]["init_args"]
    args = [*SMALL_LOADER, "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]
    if model.get("grad_cache_chunk"):  # the small test batches still go through GradCache's chunks
        args.append("--model.init_args.grad_cache_chunk=2")
    if config["model"]["class_path"] == "lightning_modules.MLLMEmbedder":
        backbone = model["backbone"]["init_args"]
        if backbone["name_or_path"] != "tiny":
            assert embedders is not None, f"{experiment.name} needs the saved tiny embedders"
            # The card's real image limits would make thousands of tokens per view of the tiny model.
            args += [f"--model.init_args.backbone.init_args.name_or_path={embedders[backbone['family']]}",
                     "--model.init_args.backbone.init_args.min_pixels=784",
                     "--model.init_args.backbone.init_args.max_pixels=4096"]
        args += SMALL_MLLM_LOADER
        model = {}
    if config["model"]["class_path"].startswith("lightning_modules.ProCIR"):
        # 1 to 4 image tokens per view instead of the paper's 16 to 256: the runs check wiring, not vision.
        args += ["--model.init_args.backbone.init_args.min_pixels=1024",
                 "--model.init_args.backbone.init_args.max_pixels=4096", *SMALL_MLLM_LOADER]
        if model["backbone"]["init_args"]["name_or_path"] != "tiny":
            assert qwen_folder is not None, f"{experiment.name} needs the saved tiny Qwen3.5"
            args.append(f"--model.init_args.backbone.init_args.name_or_path={qwen_folder}")
        if model.get("sft_checkpoint"):
            assert sft is not None, f"{experiment.name} needs an SFT checkpoint"
            args.append(f"--model.init_args.sft_checkpoint={sft}")
        model = {}  # no fusion head, no stage-1 checkpoint
    if config["model"]["class_path"] == "lightning_modules.SPRC":
        if model["backbone"]["init_args"]["name_or_path"] != "tiny":
            assert blip2_folder is not None, f"{experiment.name} needs the saved tiny BLIP-2"
            args.append(f"--model.init_args.backbone.init_args.name_or_path={blip2_folder}")
        model = {"init_checkpoint": model.get("init_checkpoint")}  # no CLIP, no fusion head
    blip2 = model.get("query_text_encoder", {}).get("init_args", {}).get("backbone", {}).get("init_args", {})
    if blip2.get("name_or_path", "tiny") != "tiny":  # LLaVA-caption's BLIP-2 query text
        assert blip2_folder is not None, f"{experiment.name} needs the saved tiny BLIP-2"
        args += [f"--model.init_args.query_text_encoder.init_args.backbone.init_args.name_or_path={blip2_folder}",
                 "--model.init_args.query_text_encoder.init_args.dim=48"]
    if data["class_path"].endswith("SyntheticDataModule") and data["init_args"].get("sessions"):
        # Generated sessions: a folder of their own, written on first use (200 products, 40 sessions).
        args += [f"--data.init_args.data_dir={datasets['synthetic'].parent / 'synthetic-sessions'}",
                 "--data.init_args.products=200", "--data.init_args.sessions=40"]
    elif data["class_path"].endswith("SyntheticDataModule"):
        args += [f"--data.init_args.data_dir={datasets['synthetic']}", "--data.init_args.products=200"]
    else:
        kind = next(k for k in ("fashioniq", "fashionmv") if k in data["init_args"]["data_dir"])
        args.append(f"--data.init_args.data_dir={datasets[kind]}")
        if data["init_args"].get("captions_file"):
            from lightning_modules.families.llava_caption import OracleCaptioner
            from lightning_modules.families.llava_caption.caption_job import run_caption_job

            sidecar = datasets[kind] / "captions.oracle.jsonl"
            run_caption_job(datasets[kind], sidecar, OracleCaptioner(), progress=False)
            args.append(f"--data.init_args.captions_file={sidecar}")
    backbone = model.get("backbone", {}).get("init_args", {}).get("name_or_path")
    if backbone not in (None, "tiny"):
        args += [f"--model.init_args.backbone.init_args.name_or_path={tiny_folder}",
                 "--model.init_args.fusion.init_args.dim=48"]
        if model.get("fusion", {}).get("init_args", {}).get("heads"):
            args.append("--model.init_args.fusion.init_args.heads=4")
    if model.get("init_checkpoint"):
        assert checkpoint is not None, f"{experiment.name} needs a stage-1 checkpoint"
        args.append(f"--model.init_args.init_checkpoint={checkpoint}")
    return args


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_experiment_fast_dev_run(experiment: Path, request: pytest.FixtureRequest, datasets, tmp_path: Path) -> None:
    # Fixtures by need: the ProCIR ones are not built for a CLIP experiment and vice versa.
    class_path = merged_config(experiment)["model"]["class_path"]
    procir = class_path.startswith("lightning_modules.ProCIR")
    lora = merged_config(experiment)["model"]["init_args"].get("lora")
    if class_path == "lightning_modules.MLLMEmbedder" and not lora:  # zero-shot baselines: validate, as they say
        # The 2B and 8B (7B) files of a model differ only in the hub id, which the same saved tiny
        # model replaces: the second would repeat the first run exactly.
        backbone = merged_config(experiment)["model"]["init_args"]["backbone"]["init_args"]
        twin = (backbone["family"], backbone.get("card"), experiment.stem.rsplit("_", 1)[1])
        if twin in VALIDATED_BASELINES:
            return
        VALIDATED_BASELINES.add(twin)
        args = data_args(experiment, datasets, embedders=request.getfixturevalue("embedder_folders"))
        cli = build_cli(["validate", "--config", str(experiment), "--trainer.fast_dev_run=1",
                         f"--trainer.default_root_dir={tmp_path}", *args])
        assert "val/recall_at_10" in cli.trainer.callback_metrics
        assert cli.model.view_strategy in experiment.stem and cli.model.describe()["strategy"] in experiment.stem
        return
    fixtures = {"qwen_folder": "qwen_folder", "sft": "sft_checkpoint"} if procir else {
        "tiny_folder": "tiny_folder", "checkpoint": "stage1_checkpoint"}
    if class_path == "lightning_modules.MLLMEmbedder":  # fine-tuned (LoRA): fit like the others
        fixtures = {"embedders": "embedder_folders"}
    elif class_path == "lightning_modules.SPRC":  # BLIP-2 only, and its own stage-1 checkpoint
        fixtures = {"blip2_folder": "blip2_folder", "checkpoint": "sprc_checkpoint"}
    elif "query_text_encoder" in merged_config(experiment)["model"]["init_args"]:
        fixtures["blip2_folder"] = "blip2_folder"
    kwargs = {k: request.getfixturevalue(v) for k, v in fixtures.items()}
    cli = build_cli(["fit", "--config", str(experiment), "--trainer.fast_dev_run=1",
                     f"--trainer.default_root_dir={tmp_path}", *data_args(experiment, datasets, **kwargs)])
    if procir and type(cli.model).__name__ == "ProCIR" and cli.model.image_text is not None:  # image-text too
        assert {"val/i2t_recall_at_1", "val/t2i_recall_at_5", "val/recall_at_10"} <= set(cli.trainer.callback_metrics)


@pytest.mark.slow
def test_train_from_a_saved_backbone_folder_and_log_to_mlflow(datasets, tiny_folder, tmp_path: Path) -> None:
    import mlflow

    demo = ROOT / "experiments/demos/clip4cir.yaml"
    common = ["--config", str(demo), f"--model.init_args.backbone.init_args.name_or_path={tiny_folder}",
              f"--trainer.default_root_dir={tmp_path}", *data_args(demo, datasets, tiny_folder)]
    cli = build_cli(["fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4"])
    assert cli.model.backbone.name_or_path == str(tiny_folder)
    logger = cli.trainer.logger
    client = mlflow.MlflowClient(logger._tracking_uri)
    run = client.get_run(logger.run_id)
    assert run.data.params["backbone/init_args/name_or_path"] == str(tiny_folder)
    assert run.data.params["batch_size"] == "8"
    assert 0.0 <= run.data.metrics["val/recall_at_10"] <= 1.0
    assert "val/synth_studio/recall_at_10" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(logger.run_id)}
    assert {"config.yaml", "eval_results.json", "retrieval_examples.png", "recall_curves.png"} <= artifacts
    config = Path(client.download_artifacts(logger.run_id, "config.yaml", str(tmp_path))).read_text()
    assert str(tiny_folder) in config and "class_path: lightning_modules.CLIP4CIR" in config
    results = json.loads(Path(client.download_artifacts(logger.run_id, "eval_results.json", str(tmp_path)))
                         .read_text())
    assert results["overall"]["recall_at_10"] == pytest.approx(run.data.metrics["val/recall_at_10"])
    assert set(results["datasets"]) == {"synth_studio", "synth_street"}
    for line in ("text_blind/recall_at_10", "chance/recall_at_10", "recall_subset_at_1", "text_blind/score"):
        assert results["overall"][line] == pytest.approx(run.data.metrics[f"val/{line}"])
    assert 0 < results["datasets"]["synth_studio"]["chance/recall_at_10"] < 1
    assert results["datasets"]["synth_studio"]["gallery_size"] > 0 and len(results["config_hash"]) == 16
    assert Path(cli.trainer.checkpoint_callback.last_model_path).is_file()

    # The same checkpoint through `validate` reproduces the logged recall.
    last = cli.trainer.checkpoint_callback.last_model_path
    val = build_cli(["validate", *common, "--trainer.logger=false", f"--ckpt_path={last}"])
    assert float(val.trainer.callback_metrics["val/recall_at_10"]) == pytest.approx(
        run.data.metrics["val/recall_at_10"], abs=1e-6)

    # What the MLflow UI and cir compare show of the two runs.
    assert "_instantiator" not in run.data.params and not any(k.startswith("_") for k in run.data.params)
    assert run.info.run_name == f"demo@{tiny_folder.name}"  # the overridden backbone, not the config's
    assert run.data.tags["stage"] == "fit"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
    (inp,) = run.inputs.dataset_inputs
    manifest = datasets["synthetic"] / "manifest.json"
    assert inp.dataset.name == datasets["synthetic"].name and inp.dataset.source_type == "local"
    assert inp.dataset.digest == hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"
    logged = build_cli(["validate", *common, f"--ckpt_path={last}"])
    val_run = client.get_run(logged.trainer.logger.run_id)
    assert val_run.info.run_id != run.info.run_id
    assert val_run.info.run_name == f"demo@{tiny_folder.name} (validate)" and val_run.data.tags["stage"] == "validate"
    val_results = json.loads(Path(client.download_artifacts(val_run.info.run_id, "eval_results.json", str(tmp_path)))
                             .read_text())
    trained = torch.load(last, map_location="cpu", weights_only=True)
    assert (val_results["epoch"], val_results["global_step"]) == (trained["epoch"], trained["global_step"])
    assert val_results["global_step"] > 0

    from cir.compare import build_table

    header, rows, _ = build_table([run, client.get_run(val_run.info.run_id)], [10])
    assert header[:3] == ["run", "stage", "family"] and {r[1] for r in rows} == {"fit", "validate"}


@pytest.mark.slow
def test_fashioniq_predict_writes_a_top50_submission(datasets, tiny_folder, tmp_path: Path) -> None:
    exp = ROOT / "experiments/clip4cir/fashioniq.yaml"
    args = ["--config", str(exp), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
            *data_args(exp, datasets, tiny_folder)]
    build_cli(["predict", *args])
    rows = json.loads((tmp_path / "submission_test.json").read_text())
    queries = {c: json.loads((datasets["fashioniq"].parent / "fiq-layout" / "captions" / f"cap.{c}.test.json")
                             .read_text()) for c in ("dress", "shirt", "toptee")}
    assert len(rows) == sum(len(q) for q in queries.values())
    for row in rows:
        category = row["dataset"].removeprefix("fashioniq_")
        gallery = json.loads((datasets["fashioniq"].parent / "fiq-layout" / "image_splits" /
                              f"split.{category}.test.json").read_text())
        assert len(row["ranking"]) == min(50, len(gallery)) and set(row["ranking"]) <= set(gallery)
        assert "target" not in row


@pytest.mark.slow
def test_procir_sft_without_its_checkpoint_names_the_command(datasets, qwen_folder, tmp_path: Path) -> None:
    exp = ROOT / "experiments/procir_sft.yaml"
    args = [a for a in data_args(exp, datasets, qwen_folder=qwen_folder, sft=tmp_path / "unused.ckpt")
            if "sft_checkpoint" not in a]
    with pytest.raises(FileNotFoundError, match=r"lightning fit --config experiments/procir/sft_stage\.yaml"):
        build_cli(["fit", "--config", str(exp), *args, f"--trainer.default_root_dir={tmp_path}",
                   "--trainer.fast_dev_run=1", f"--model.init_args.sft_checkpoint={tmp_path}/missing/last.ckpt"])


@pytest.mark.slow
def test_sft_then_contrastive_chain(datasets, qwen_folder, sft_checkpoint, tmp_path: Path) -> None:
    """The tiny SFT stage's checkpoint initialises the contrastive model's backbone."""
    from lightning_modules.backbones import QwenBackbone
    from lightning_modules.core import load_weights

    sft_state = load_weights(sft_checkpoint)["state_dict"]
    fresh = QwenBackbone(str(qwen_folder)).state_dict()
    changed = [k for k, v in fresh.items() if not torch.equal(v, sft_state[f"backbone.{k}"])]
    assert changed, "the SFT steps changed no weight"
    exp = ROOT / "experiments/procir_sft.yaml"
    cli = build_cli(["fit", "--config", str(exp), *data_args(exp, datasets, qwen_folder=qwen_folder,
                                                             sft=sft_checkpoint),
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
                     "--trainer.limit_val_batches=0"])
    # One AdamW step at lr 1e-5 moves a weight by ~1e-5; the SFT steps (lr 1e-3) moved them by far more.
    loaded = cli.model.backbone.state_dict()
    assert max((loaded[k] - sft_state[f"backbone.{k}"]).abs().max() for k in changed) < 1e-4
    assert max((fresh[k] - sft_state[f"backbone.{k}"]).abs().max() for k in changed) > 1e-3
    assert cli.model.variant_switches()["sft"] is True


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["meanpool", "maxsim"])
def test_procir_per_view_strategies_evaluate_over_several_batches(strategy: str, datasets, tmp_path: Path) -> None:
    exp = ROOT / "experiments/demos/procir.yaml"
    cli = build_cli(["fit", "--config", str(exp), *data_args(exp, datasets), "--data.init_args.eval_batch_size=4",
                     f"--model.init_args.view_strategy={strategy}", "--trainer.max_epochs=1",
                     "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=3",
                     f"--trainer.default_root_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    queries = sum(float(v) for k, v in metrics.items()
                  if k.endswith("/queries") and k.count("/") == 2 and k.split("/")[1] not in REFERENCE_LINES)
    assert 0.0 <= float(metrics["val/recall_at_10"]) <= 1.0 and queries == 12  # 3 query batches of 4


def _answers(out: str) -> dict[str, list[str]]:
    """{text: result ids} from cir query's output: a "[N ms] 'text'" line, a header, a row a result."""
    answers: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("[") and "ms] '" in line:
            current = answers.setdefault(line.split("] ", 1)[1].strip("'"), [])
        elif current is not None and line.split() and line.split()[0].isdigit():
            current.append(line.split()[1])
        elif current is not None and not line.lstrip().startswith("rank"):
            current = None
    return answers


@pytest.mark.slow
def test_cir_query_answers_each_text_from_the_cached_source(datasets, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from cir.query import main

    views = []
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        views.append(str(tmp_path / f"view{i}.png"))
        Image.new("RGB", (96, 128), color).save(views[-1])
    exp = ROOT / "experiments/demos/procir.yaml"
    main(["--config", str(exp), "--untrained", "--images", *views, "-k", "3", "--text", "make it red", "--text",
          "add a pocket",
          "--dataset", "synth_studio", "--", *data_args(exp, datasets)])
    out = capsys.readouterr().out
    assert "source cached" in out and "gallery:" in out and "of synth_studio" in out
    assert len(_answers(out)) == 2 and all(len(ids) == 3 for ids in _answers(out).values())  # 3 products each
    # Two datasets in the split: cir query, like cir search, asks which gallery to search.
    with pytest.raises(SystemExit, match="choose one with --dataset"):
        main(["--config", str(exp), "--untrained", "--images", *views, "--text", "x", "--", *data_args(exp, datasets)])


@pytest.mark.slow
def test_cir_query_runs_the_full_forward_for_a_family_without_a_cache(datasets, tiny_folder, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """CLIP4CIR has no KV cache: each text is one full query forward, ranked in the chosen gallery."""
    from PIL import Image

    from cir.query import main

    views = [str(tmp_path / "front.png"), str(tmp_path / "back.png")]
    for path, color in zip(views, [(200, 30, 30), (30, 30, 200)], strict=True):
        Image.new("RGB", (64, 64), color).save(path)
    main(["--config", str(DEMO), "--untrained", "--images", *views, "-k", "4", "--dataset", "synth_street", "--text",
          "make it red",
          "--", *data_args(DEMO, datasets, tiny_folder)])
    out = capsys.readouterr().out
    assert "no cache for this model" in out and "of synth_street" in out
    ids = _answers(out)["make it red"]
    from datamodules.shards import SkipCounter, iterate_shards, read_manifest, shard_urls

    folder = datasets["synthetic"]
    street = {smp["json"]["product_id"] for smp in iterate_shards(
        shard_urls(folder, read_manifest(folder), "val", "gallery"), handler=SkipCounter("t"))
        if smp["json"]["dataset"] == "synth_street"}
    assert len(ids) == 4 and set(ids) <= street


@pytest.mark.slow
def test_the_released_checkpoint_is_evaluated_without_training(datasets, qwen_folder, tmp_path: Path) -> None:
    """`lightning validate --config experiments/procir/eval_released.yaml` on a plain Qwen3.5 folder
    whose tokenizer already holds <emb_all> (as the release's does): no resize, the paper's protocol."""
    from lightning_modules.backbones import QwenBackbone

    exp = ROOT / "experiments/procir/eval_released.yaml"
    cli = build_cli(["validate", "--config", str(exp), *data_args(exp, datasets, qwen_folder=qwen_folder),
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    metrics = cli.trainer.callback_metrics
    names = {n.split("/")[1] for n in metrics if n.count("/") == 2} - set(REFERENCE_LINES)
    assert names and {f"val/{d}/recall_at_{k}" for d in names for k in (1, 5, 10)} <= set(metrics)
    assert 0.0 <= float(metrics["val/score"]) <= 1.0
    rows = QwenBackbone(str(qwen_folder)).model.get_input_embeddings().weight.shape[0]
    assert cli.model.backbone.model.get_input_embeddings().weight.shape[0] == rows  # <emb_all> was there
    assert cli.model.evaluation.protocol() == {"top_k": (1, 5, 10), "score_k": (5, 10), "gallery_protocol": "all",
                                               "remove_source": False}
