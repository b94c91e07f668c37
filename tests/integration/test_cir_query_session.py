"""``cir query --session`` end to end (issue 27): turns read from stdin, a result clicked with
``:click``; the printed rankings equal a brute-force search with the whole ProCIR dialogue recomputed."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_serve import data_args

ROOT = Path(__file__).resolve().parents[2]
DS = "synth_street"


def answers(out: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """(heading, [(id, score)]) per turn: a "turn N [..] 'text' from X" line, a header, a row a result."""
    turns: list[tuple[str, list[tuple[str, float]]]] = []
    for line in out.splitlines():
        if line.startswith("turn "):
            turns.append((line, []))
        elif turns and line.split() and line.split()[0].isdigit():
            turns[-1][1].append((line.split()[1], float(line.split()[2])))
    return turns


@pytest.mark.slow
def test_session_turns_from_stdin_rank_as_the_full_dialogue(small_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from cir.models import encode_gallery, load_model_and_data
    from cir.query import main
    from cir.serve.gallery import GalleryStore
    from lightning_modules.families.procir.dialogue import Turn
    from lightning_modules.families.procir.session_cache import SessionEncoder

    views = []
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        views.append(str(tmp_path / f"view{i}.png"))
        Image.new("RGB", (96, 128), color).save(views[-1])
    exp = ROOT / "experiments/demos/procir.yaml"
    texts = ["like this but blue", "with long sleeves", "and a back zipper"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{texts[0]}\n{texts[1]}\n:click 2\n{texts[2]}\n"))
    main(["--config", str(exp), "--untrained", "--images", *views, "-k", "5", "--dataset", DS, "--session", "--",
          *data_args(small_data)])
    out = capsys.readouterr().out
    assert "session: KV cache" in out
    turns = answers(out)
    clicked = turns[1][1][1][0]
    assert [h.split(" [")[0] for h, _ in turns] == ["turn 1", "turn 2", "turn 3"]
    assert turns[2][0].endswith(f"'{texts[2]}' from {clicked}") and f"result 2 ({clicked})" in out
    # The reference: the same (untrained) model, the whole session in one forward, every product scored.
    model, dm = load_model_and_data([str(exp)], None, data_args(small_data))
    store = GalleryStore(dm.data_dir, "val", dm.captions)
    with torch.no_grad():
        full = SessionEncoder(model).encode_session([Turn(texts[0], views), Turn(texts[1]),
                                                     Turn(texts[2], store.source(DS, clicked)[0])])
    emb, ids, datasets = encode_gallery(model, dm, "val")
    keep = [i for i, d in enumerate(datasets) if d == DS]
    for (_, shown), q in zip(turns, full, strict=True):
        scores = emb[keep].float() @ q
        order = scores.argsort(descending=True)[:5]
        assert [pid for pid, _ in shown] == [ids[keep[i]] for i in order]
        assert all(abs(s - scores[i].item()) < 1.5e-4 for (_, s), i in zip(shown, order, strict=True))
