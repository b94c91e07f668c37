"""Multi-turn ProCIR sessions with a KV cache (issue 27): turn t runs only its increment on turn
t-1's cache, and its q equals the whole dialogue's forward (the reference: ``encode_session``).

Tolerance: 1e-4 on unit vectors in float32 (measured ≤ 2e-7 over 5 turns: the chunked linear-
attention kernel sums in a different order when it starts from a cached state)."""

from __future__ import annotations

import pytest
import torch
from support.procir import model, product_images, views

from lightning_modules.backbones.qwen import QwenBackbone
from lightning_modules.backbones.qwen_chat import Dialogue
from lightning_modules.families.procir.dialogue import Turn
from lightning_modules.families.procir.interactive import InteractiveEncoder
from lightning_modules.families.procir.session_cache import SessionEncoder, SessionTooLong

TOL = 1e-4
TEXTS = ["like this but blue", "with long sleeves", "and a back zipper", "a bit shorter", "in a softer fabric"]


@pytest.fixture(scope="module")
def backbone() -> QwenBackbone:
    backbone = QwenBackbone("tiny", seed=1).eval()
    # Random init decays the linear-attention state within a few tokens and scales its output down;
    # a slow decay and a louder output make the recurrent state carry earlier turns.
    with torch.no_grad():
        for layer in backbone.model.model.language_model.layers:
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.A_log.fill_(-6.0)
                layer.linear_attn.out_proj.weight.mul_(30.0)
    return backbone


@pytest.fixture(scope="module")
def encoder(backbone: QwenBackbone) -> InteractiveEncoder:
    return InteractiveEncoder(model(backbone, image_text_eval=False))


def cached(enc: SessionEncoder, turns: list[Turn]) -> tuple[list[torch.Tensor], list]:
    q, state = enc.start_session(turns[0].reference, turns[0].text)
    qs, states = [q], [state]
    for turn in turns[1:]:
        q, state = enc.extend(state, turn.text, turn.reference)
        qs.append(q)
        states.append(state)
    return qs, states


def session(backbone: QwenBackbone, clicked_at: int | None = 3) -> list[Turn]:
    start, clicked = views(backbone, 2, 70), views(backbone, 3, 71)
    return [Turn(text, start if t == 1 else clicked if t == clicked_at else None) for t, text in enumerate(TEXTS, 1)]


@pytest.mark.parametrize("clicked_at", [None, 3])
def test_every_cached_turn_equals_the_full_dialogue(encoder: InteractiveEncoder, backbone: QwenBackbone,
                                                    clicked_at: int | None) -> None:
    turns = session(backbone, clicked_at)
    qs, states = cached(encoder, turns)
    whole = encoder.encode_session(turns)
    for t in range(1, 6):
        upto = encoder.encode_session(turns[:t])  # the session as it stood after turn t, recomputed
        assert torch.allclose(qs[t - 1], upto[-1], atol=TOL), t
        assert torch.allclose(qs[t - 1], whole[t - 1], atol=TOL), t
        full, _ = encoder.dialogues.session([Turn(x.text, x.reference) for x in turns[:t]])
        assert states[t - 1].tokens == len(full.ids) and states[t - 1].turns == t
    # Each turn's q is its own (the test would pass vacuously if every turn embedded alike).
    assert min((qs[i] - qs[i + 1]).abs().max().item() for i in range(4)) > 1e-2
    # The cache grows with the dialogue; its bytes are counted for the serving LRU.
    sizes = [s.nbytes for s in states]
    assert all(a < b for a, b in zip(sizes, sizes[1:], strict=False)) and sizes[0] > 0
    seen = states[-1].past_key_values.get_seq_length()
    assert seen == states[-1].tokens


def test_a_clicked_reference_changes_the_turn_and_the_turns_after_it(encoder: InteractiveEncoder,
                                                                      backbone: QwenBackbone) -> None:
    clicked, typed = cached(encoder, session(backbone, 3))[0], cached(encoder, session(backbone, None))[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(clicked[:2], typed[:2], strict=True))
    assert all((a - b).abs().max().item() > 1e-2 for a, b in zip(clicked[2:], typed[2:], strict=True))


def test_increment_positions_are_the_full_dialogue_positions(encoder: InteractiveEncoder,
                                                             backbone: QwenBackbone) -> None:
    turns = session(backbone, 3)
    full, _ = encoder.dialogues.session(turns)
    inputs = encoder._inputs(full)
    expected, _ = backbone.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    pieces, start = [], 0
    for t, turn in enumerate(turns):
        piece = encoder.dialogues.session_turn(Dialogue(), Turn(turn.text, turn.reference, continued=t > 0))
        pos, start = encoder.positions(encoder._inputs(piece), start)
        pieces.append(pos)
    assert torch.equal(torch.cat(pieces, dim=-1), expected)
    # Images make M-RoPE positions differ from token indices: the shift is what carries turn 3's views.
    assert int(expected.max()) + 1 < expected.shape[-1]


def test_one_state_extended_twice_gives_each_branch_its_own_full_dialogue(encoder: InteractiveEncoder,
                                                                          backbone: QwenBackbone) -> None:
    turns = session(backbone, None)[:2]
    _, states = cached(encoder, turns)
    before = states[-1].past_key_values.get_seq_length()
    red, red_state = encoder.extend(states[-1], "in red")
    green, _ = encoder.extend(states[-1], "in green")
    again, _ = encoder.extend(states[-1], "in red")
    assert torch.allclose(red, encoder.encode_session([*turns, Turn("in red")])[-1], atol=TOL)
    assert torch.allclose(green, encoder.encode_session([*turns, Turn("in green")])[-1], atol=TOL)
    assert torch.equal(red, again) and (red - green).abs().max().item() > 1e-2
    assert states[-1].past_key_values.get_seq_length() == before < red_state.tokens


def test_turn_one_is_the_single_turn_query(backbone: QwenBackbone) -> None:
    source = product_images(2, 72)
    for two_stage in (True, False):
        procir = model(backbone, two_stage_dialogue=two_stage, image_text_eval=False)
        enc = SessionEncoder(procir)
        q, state = enc.start_session(source, "make it red")
        with torch.no_grad():
            expected = procir.query_embeddings([enc.views(source)], ["make it red"])[0]
        assert torch.allclose(q, expected, atol=1e-5) and state.turns == 1


def test_single_turn_procir_sessions_cache_too(backbone: QwenBackbone) -> None:
    enc = SessionEncoder(model(backbone, two_stage_dialogue=False, image_text_eval=False))
    turns = session(backbone, 3)[:4]
    qs, _ = cached(enc, turns)
    assert torch.allclose(torch.stack(qs), enc.encode_session(turns), atol=TOL)


def test_a_turn_past_the_context_length_is_refused_naming_the_limit(backbone: QwenBackbone) -> None:
    enc = SessionEncoder(model(backbone, image_text_eval=False))
    assert enc.max_tokens == enc.context_length == 4096
    _, state = enc.start_session(product_images(1, 73), "make it red")
    limit = state.tokens + len(enc.turn("red").ids)  # room for exactly one more short turn
    short = SessionEncoder(enc.model, max_tokens=limit)
    long = "and now with long sleeves, a round neck and a pocket"
    with pytest.raises(SessionTooLong, match=rf"{limit + len(enc.turn(long).ids) - len(enc.turn('red').ids)} tokens "
                                             rf"long; the model takes at most {limit} \(a limit below its context "
                                             rf"length of 4096\)"):
        short.extend(state, long)
    q, full = short.extend(state, "red")  # a turn that just fits
    assert q.shape == (backbone.dim,) and full.tokens == limit
