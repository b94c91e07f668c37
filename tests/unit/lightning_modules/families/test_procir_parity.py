"""Dialogue parity with the FashionMV release's evaluator (``../shared/notes``: what it does).

The evaluator renders each prompt with the checkpoint's chat template, then puts an empty
``<think>\\n\\n</think>\\n\\n`` after every ``<|im_start|>assistant\\n`` that lacks one, and the processor
expands each ``<|image_pad|>`` to the view's patch count. A document is ``user: [views]`` →
``assistant: <emb_all>``; a query is the two-stage dialogue with the short modification text; the
embedding is the hidden state at the last ``<emb_all>``.

The test tokenizer is a byte-level BPE (whitespace changes its ids, as Qwen's does) carrying a
chat template written here from the behaviour of Qwen3.5's: parts concatenated in order, images as
``<|vision_start|><|image_pad|><|vision_end|>``, each message's content trimmed, no default system
turn, and an empty think block only on assistant turns after the last user turn.
"""

from __future__ import annotations

import pytest
from PIL import Image
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast, Qwen3_5ForConditionalGeneration

from datamodules.synthetic.text import vocabulary
from lightning_modules import ProCIR
from lightning_modules.backbones.qwen import CHAT_TOKENS, EMB_TOKEN, IMAGE_PAD, QwenBackbone, build_config
from lightning_modules.backbones.registry import get_preset

TEMPLATE = (
    "{%- set last = namespace(user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set last.user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.content is string %}{%- set body = m.content %}"
    "{%- else %}{%- set acc = namespace(text='') %}{%- for part in m.content %}"
    "{%- if part.type == 'image' %}{%- set acc.text = acc.text + '<|vision_start|><|image_pad|><|vision_end|>' %}"
    "{%- else %}{%- set acc.text = acc.text + part.text %}{%- endif %}{%- endfor %}"
    "{%- set body = acc.text %}{%- endif %}"
    "{%- set body = body | trim %}"
    "{%- if m.role == 'assistant' and loop.index0 > last.user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + body + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + body + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
)
THINK_BLOCK = "<think>\n\n</think>\n\n"
ASSISTANT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> QwenBackbone:
    """A tiny Qwen3.5 whose tokenizer is a byte-level BPE with a chat template, loaded by path."""
    corpus = [" ".join(vocabulary()), "make it red, with long sleeves and an open back."] * 3
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=1, special_tokens=["<pad>", *CHAT_TOKENS],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>",
                                  additional_special_tokens=list(CHAT_TOKENS))
    tok.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("bpe-qwen")
    Qwen3_5ForConditionalGeneration(build_config(get_preset("qwen3.5", "tiny").config, tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    QwenBackbone("tiny").processor.save_pretrained(folder)
    return QwenBackbone(str(folder)).eval()


def official_ids(backbone: QwenBackbone, messages: list[dict], views: list) -> list[int]:
    """What the evaluator feeds the model: template, think blocks patched in, image pads expanded."""
    text = backbone.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    pieces = text.split(ASSISTANT)
    text = pieces[0] + "".join(ASSISTANT + (p if p.startswith("<think>") else THINK_BLOCK + p) for p in pieces[1:])
    counts = iter(backbone.image_tokens(v) for v in views)
    text = "".join(part + (IMAGE_PAD * next(counts) if i < text.count(IMAGE_PAD) else "")
                   for i, part in enumerate(text.split(IMAGE_PAD)))
    return backbone.tokenizer(text, add_special_tokens=False)["input_ids"]


def images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (64 + 32 * i, 96), (40 * i, 90, 200 - 30 * i)) for i in range(n)]


def user_images(n: int) -> dict:
    return {"role": "user", "content": [{"type": "image"} for _ in range(n)]}


EMB = {"role": "assistant", "content": [{"type": "text", "text": EMB_TOKEN}]}


@pytest.mark.parametrize("n_views", [1, 3])
def test_document_ids_and_embedding_position_match_the_evaluator(backbone: QwenBackbone, n_views: int) -> None:
    views = [backbone.image_transform(img) for img in images(n_views)]
    ours = ProCIR(backbone, two_stage_dialogue=True).eval().document(views)
    theirs = official_ids(backbone, [user_images(n_views), EMB], views)
    emb_id = backbone.token_ids[EMB_TOKEN]
    last = max(i for i, t in enumerate(theirs) if t == emb_id)
    assert ours.ids == theirs[: last + 1]  # the same ids up to the pooled <emb_all>
    assert ours.emb_positions == [last]


@pytest.mark.parametrize("text", ["make it red", "  make it red, with long sleeves  ", "\tadd an open back.\n"])
def test_two_stage_query_ids_and_positions_match_the_evaluator(backbone: QwenBackbone, text: str) -> None:
    views = [backbone.image_transform(img) for img in images(2)]
    ours = ProCIR(backbone, two_stage_dialogue=True).eval().query(views, text)
    messages = [user_images(2), EMB, {"role": "user", "content": [{"type": "text", "text": text}]}, EMB]
    theirs = official_ids(backbone, messages, views)
    emb_id = backbone.token_ids[EMB_TOKEN]
    positions = [i for i, t in enumerate(theirs) if t == emb_id]
    assert ours.ids == theirs[: positions[-1] + 1]
    assert ours.emb_positions == positions  # s at the first <emb_all>, q at the last


def test_whitespace_changes_these_ids(backbone: QwenBackbone) -> None:
    """The check above has teeth: with this tokenizer untrimmed text gives other ids."""
    tok = backbone.tokenizer
    assert tok(" make it red", add_special_tokens=False)["input_ids"] != tok("make it red",
                                                                             add_special_tokens=False)["input_ids"]
