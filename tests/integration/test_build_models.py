"""`cir build` through real models with random weights: the tiny Qwen3.5 in this process, and the
same model behind a real `transformers serve` on localhost. Their answers are not JSON, so every
request takes the retry-then-fail path, and the counts must say so."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.ports import free_port
from support.servers import wait_healthy

from cir.build import main as cir_build
from datamodules.synthetic import generate
from datamodules.synthetic.catalogue import write_catalogue_layout
from lightning_modules.backbones import QwenBackbone

SUPPORT = Path(__file__).resolve().parents[1] / "support"
# A chat template with image parts and a generation prompt (the tiny tokenizer has none of its own).
CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}{%- if m.content is string %}"
          "{{- m.content }}{%- else %}{%- for p in m.content %}{%- if p.type == 'image' %}"
          "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}{%- elif p.type == 'text' %}{{- p.text }}"
          "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def small_catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small-catalogue")
    write_catalogue_layout(root, generate(10, seed=5), seed=5, accessories=0)
    return root


def _refused_empty(build: pytest.ExceptionInfo[SystemExit], out: Path) -> None:
    """Nothing passed stage 1, so the build fails naming that stage, the summary kept to look at."""
    message = str(build.value.code)
    assert message.startswith("cir build: the release has no triplets: no product passed stage 1 (10 failed")
    assert str(out / "build_summary.json") in message


def _check_all_failed(out: Path, n: int, attempts: int, max_tokens: int) -> dict:
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["captions"] == {"requested": n, "non_clothing": 0, "failed": n, "clothing": 0}
    assert summary["verify"]["checked"] == 0 and summary["triplets"]["sources"] == 0
    usage = summary["usage"]["captions"]
    assert usage["answers"] == usage["invalid_answers"] == attempts * n
    assert 0 < usage["completion_tokens"] <= attempts * n * max_tokens and usage["prompt_tokens"] > 0
    failures = [json.loads(line) for line in (out / "build" / "captions.jsonl").read_text().splitlines()]
    final = [r for r in failures if not r.get("retry")]
    assert len(final) == n and all("raw" in r and r["error"] and r["attempts"] == attempts for r in final)
    for split in ("train", "val"):
        assert (out / f"{split}_triplets.jsonl").read_text() == ""
    return summary


@pytest.mark.slow
def test_in_process_tiny_qwen_fails_every_answer_after_its_retries(small_catalogue: Path, tmp_path: Path) -> None:
    QwenBackbone("tiny").save_pretrained(tmp_path / "qwen")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as build:
        cir_build(["--catalogue", str(small_catalogue), "--out", str(out), "--backend", "transformers", "--model",
                   str(tmp_path / "qwen"), "--max-tokens", "6", "--attempts", "2", "--batch-size", "5",
                   "--temperature", "0", "--image-encoder", "clip:tiny", "--no-progress"])
    _refused_empty(build, out)
    summary = _check_all_failed(out, 10, attempts=2, max_tokens=6)
    assert summary["models"]["captions"] == [str(tmp_path / "qwen")]



@pytest.mark.slow
def test_transformers_serve_on_localhost(small_catalogue: Path, tmp_path: Path) -> None:
    if shutil.which("transformers", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the transformers CLI is not installed beside this Python")
    folder = tmp_path / "tiny-vlm"
    QwenBackbone("tiny").save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHATML)
    shutil.copy(SUPPORT / "tiny_vlm_processor.py", folder / "tiny_vlm_processor.py")
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "ImageOnlyQwenVLProcessor",
        "auto_map": {"AutoProcessor": "tiny_vlm_processor.ImageOnlyQwenVLProcessor"}}))
    port = free_port()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", str(folder), "--device",
                               "cpu", "--port", str(port), "--trust-remote-code"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))  # noqa: SIM115
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, tmp_path / "serve.log", name="transformers serve")
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as build:
            cir_build(["--catalogue", str(small_catalogue), "--out", str(out), "--backend", "openai", "--base-url",
                       f"http://127.0.0.1:{port}/v1", "--model", str(folder), "--max-tokens", "6", "--attempts",
                       "2", "--temperature", "0", "--concurrency", "4", "--max-retries", "1", "--image-encoder",
                       "clip:tiny", "--no-progress"])
        _refused_empty(build, out)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    summary = _check_all_failed(out, 10, attempts=2, max_tokens=6)
    assert summary["usage"]["captions"]["transport_failures"] == 0
