"""``cir query --session`` (issue 27): the prompt's turns of one session. ``:click N`` makes result N
the next turn's reference, ``:new`` starts over; a model without a session cache queries the
reference with the texts since it was set joined by ", "; ProCIR continues its KV cache and ranks
as the whole dialogue recomputed."""

from __future__ import annotations

import torch
from PIL import Image
from support.procir import model, product_images

from cir.query import _lines, repl
from cir.query_session import CachedTurns, Conversation, JoinedTurns, Reference
from lightning_modules.backbones.qwen import QwenBackbone
from lightning_modules.families.procir.dialogue import Turn
from lightning_modules.families.procir.session_cache import SessionEncoder

IDS = [f"p{i}" for i in range(6)]
SCRIPT = ["like this but blue", "with long sleeves", ":click 2", "and a back zipper", ":click 9", "shorter", ":new",
          "in red"]




def clicked_views(pid: str) -> tuple[list[Image.Image], str]:
    return [Image.new("RGB", (32, 32), (10 * int(pid[1:]), 0, 0))], f"caption of {pid}"


def run(conversation: Conversation, script: list[str]) -> list[str]:
    out: list[str] = []
    repl(conversation, _lines(script), {}, k=4, write=out.append, banner=False,
         commands={"click": conversation.click, "new": conversation.new}, heading=conversation.heading)
    return "\n".join(out).splitlines()


def test_turns_without_a_cache_query_the_reference_with_the_texts_joined() -> None:
    asked: list[tuple[str, str]] = []

    def embed(views, caption: str, text: str) -> torch.Tensor:
        asked.append((caption, text))
        return torch.randn(3, generator=torch.Generator().manual_seed(len(asked)))

    def rank(q: torch.Tensor, k: int) -> list[tuple[str, float]]:
        return [(pid, 1.0 - r / 10) for r, pid in enumerate(IDS[len(asked):len(asked) + k])]  # other ids each turn

    out = run(Conversation(Reference("--images", ["front.jpg"]), JoinedTurns(embed), rank, clicked_views), SCRIPT)
    # Turn 2 had p2, p3, p4, p5: result 2 (p3) is turn 3's reference; ":click 9" is refused, changing nothing.
    assert asked == [("", "like this but blue"), ("", "like this but blue, with long sleeves"),
                     ("caption of p3", "and a back zipper"), ("caption of p3", "and a back zipper, shorter"),
                     ("", "in red")]
    assert "result 2 (p3) is the next turn's reference" in out
    assert any(line.startswith(":click 9: give a result's rank, 1 to") for line in out)
    headings = [line for line in out if line.startswith("turn ")]
    assert [h.split(" [")[0] for h in headings] == ["turn 1", "turn 2", "turn 3", "turn 4", "turn 1"]
    assert headings[2].endswith("'and a back zipper' from p3") and headings[0].endswith("from --images")
    assert "new session: the next text is turn 1 from --images" in out


def test_a_click_before_any_result_is_refused() -> None:
    conversation = Conversation(Reference("--images", []), JoinedTurns(lambda *a: torch.zeros(2)),
                                lambda q, k: [], clicked_views)
    assert run(conversation, [":click 1"]) == ["no results yet: type the first turn's text"]


def test_procir_turns_continue_the_kv_cache_and_rank_as_the_whole_dialogue() -> None:
    backbone = QwenBackbone("tiny", seed=2).eval()
    encoder = SessionEncoder(model(backbone, image_text_eval=False))
    gallery = torch.nn.functional.normalize(torch.randn(len(IDS), backbone.dim, generator=torch.Generator()
                                                        .manual_seed(0)), dim=-1)
    queries: list[torch.Tensor] = []

    def rank(q: torch.Tensor, k: int) -> list[tuple[str, float]]:
        queries.append(q)
        scores, idx = torch.topk(gallery @ q, k)
        return [(IDS[i], s) for s, i in zip(scores.tolist(), idx.tolist(), strict=True)]

    start = product_images(2, 80)
    views = {pid: product_images(1, 90 + n) for n, pid in enumerate(IDS)}
    conversation = Conversation(Reference("--images", start), CachedTurns(encoder), rank,
                                lambda pid: (views[pid], ""))
    out = run(conversation, ["like this but blue", "with long sleeves", ":click 3", "and a back zipper"])
    clicked = out[out.index(next(line for line in out if line.startswith("result 3")))].split("(")[1].split(")")[0]
    with torch.no_grad():
        full = encoder.encode_session([Turn("like this but blue", start), Turn("with long sleeves"),
                                       Turn("and a back zipper", views[clicked])])
    assert torch.allclose(torch.stack(queries), full, atol=1e-4)
    assert conversation.state.turns == 3 and (full[2] - full[1]).abs().max() > 1e-3
