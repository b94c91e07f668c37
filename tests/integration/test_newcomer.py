"""Issue 25's walk-through: the README's commands, one after another, in a fresh folder, as a new
user types them (demo, serve, query, search, compare), with the mistakes a new user makes on the
way. Every command is the installed console script in its own process. The demo's training is
shortened (one epoch of a few batches); the other commands are the README's forms on the demo's
model (`cir query` with one saved view, where the README's example shows the ProCIR demo).

A mistake must end in one to three lines on stderr, a non-zero status and no traceback; a
command that works must print no traceback and no warning of ours (``cir …: warning``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from support.ports import free_port
from support.servers import wait_healthy

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEMO = str(ROOT / "experiments/demos/clip4cir.yaml")
CKPT = "outputs/clip4cir_demo/checkpoints/last.ckpt"  # where the README says the demo writes it


def newcomer_env() -> dict[str, str]:
    """A shell's environment: none of the test suite's MLflow store or debugging switches."""
    return {k: v for k, v in os.environ.items() if k not in ("CIR_DEBUG", "CIR_VERBOSE", "MLFLOW_TRACKING_URI")}


def run(folder: Path, *argv: str, stdin: str = "", timeout: int = 600) -> subprocess.CompletedProcess:
    # stdin is always given (empty by default): a command that prompts unexpectedly ends, not hangs.
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=folder, env=newcomer_env(), input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def works(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith(("cir ", "lightning ")) and "warning" in line]
    assert not ours, ours
    return done.stdout


def mistake(done: subprocess.CompletedProcess, *words: str) -> str:
    """The one to three lines a mistake prints; they must name ``words``."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode not in (0, None), done.stdout[-2000:]
    assert 1 <= len(lines) <= 3 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in words:
        assert word in done.stderr, done.stderr
    return done.stderr


@pytest.mark.slow
def test_the_readme_commands_in_order_from_a_fresh_folder(tmp_path: Path) -> None:
    folder = tmp_path / "newcomer"
    folder.mkdir()

    # 1. make demo (= lightning fit --config experiments/demos/clip4cir.yaml), shortened.
    works(run(folder, "lightning", "fit", "--config", DEMO, "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=4"))
    assert (folder / CKPT).is_file() and (folder / "mlflow.db").is_file()
    assert (folder / "data/synthetic/manifest.json").is_file()  # the demo made its data where the README says

    # A first mistake: the checkpoint path mistyped.
    mistake(run(folder, "cir", "serve", "--config", DEMO, "--ckpt", "outputs/checkpoints/last.ckpt"),
            "outputs/checkpoints/last.ckpt")

    # 2. make serve (= cir serve --config ... --ckpt ...), then the page's first calls.
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(BIN / "cir"), "serve", "--config", DEMO, "--ckpt", CKPT, "--port", str(port)],
                              cwd=folder, env=newcomer_env(), stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, tmp_path / "serve.log", limit_s=300)
        with urllib.request.urlopen(f"{url}/datasets", timeout=30) as r:
            dataset = json.loads(r.read())[0]["name"]
        with urllib.request.urlopen(f"{url}/examples/{dataset}?n=1", timeout=30) as r:
            example = json.loads(r.read())[0]
        body = urllib.parse.urlencode({"text": example["text"], "dataset": dataset, "k": 5,
                                       "source_id": example["source_id"]}).encode()
        request = urllib.request.Request(f"{url}/search", data=body)
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        assert len(answer["results"]) == 5
        with urllib.request.urlopen(f"{url}/images/{dataset}/0/{example['source_id']}", timeout=30) as r:
            photo = folder / "front.jpg"  # the newcomer's own photo: a view saved from the page
            photo.write_bytes(r.read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()

    # 3. cir query: forgetting --ckpt, then --dataset (the demo's gallery holds two), is refused;
    # then two texts typed, and :quit.
    mistake(run(folder, "cir", "query", "--config", DEMO, "--images", "front.jpg"), "--ckpt", "--untrained")
    mistake(run(folder, "cir", "query", "--config", DEMO, "--ckpt", CKPT, "--images", "front.jpg",
                stdin="make it red\n:quit\n"), "--dataset", "synth_street", "synth_studio")
    out = works(run(folder, "cir", "query", "--config", DEMO, "--ckpt", CKPT, "--images", "front.jpg",
                    "--dataset", dataset, stdin="make it red\nadd long sleeves\n:quit\n"))
    assert out.count("rank") >= 2 and "p0" in out  # a table per text, with gallery ids

    # 4. cir search build, then query; an index queried with another model is refused.
    works(run(folder, "cir", "search", "build", "--config", DEMO, "--ckpt", CKPT, "--out", "index"))
    out = works(run(folder, "cir", "search", "query", "--index", "index", "--config", DEMO, "--ckpt", CKPT,
                    "--images", "front.jpg", "--text", "make it red", "--dataset", dataset))
    assert "p0" in out
    mistake(run(folder, "cir", "search", "query", "--index", "index", "--config", DEMO, "--untrained",
                "--images", "front.jpg", "--text", "make it red", "--dataset", dataset), "built by another model",
            "untrained (seed 0)")

    # 5. cir compare: the README's experiment, then a name that has no runs.
    out = works(run(folder, "cir", "compare", "--experiment", "fashion-cir"))
    assert "clip4cir" in out.lower() and (folder / "outputs/compare/compare.csv").is_file()
    mistake(run(folder, "cir", "compare", "--experiment", "fashioniq"), "fashioniq")
