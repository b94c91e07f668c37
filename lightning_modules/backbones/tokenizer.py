"""Offline word-level tokenizers for tiny backbones.

Hub tokenizers cannot be downloaded here, and tiny random models do not need subwords: the
generated data has a closed vocabulary (``datamodules.synthetic.text.vocabulary``), so a word-level
tokenizer over it covers every generated text with no unknown token.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)


def build_word_tokenizer(words: Iterable[str], extra_special_tokens: Iterable[str] = (),
                         model_max_length: int = 77, add_bos_eos: bool = True,
                         single_punctuation: bool = False) -> PreTrainedTokenizerFast:
    """A fast tokenizer over ``words`` plus special tokens, lower-casing, punctuation split.

    ``single_punctuation``: every punctuation character is its own token (all of ASCII's are in
    the vocabulary), so JSON such as ``{"long_caption": "..."}`` has no unknown token.
    """
    words = set(words) | (set(string.punctuation) if single_punctuation else set())
    vocab: dict[str, int] = {}
    for tok in (*SPECIALS, *extra_special_tokens, *sorted(words)):
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
                         if single_punctuation else pre_tokenizers.Whitespace())
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if add_bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
            special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length,
        pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
    )
    extra = list(extra_special_tokens)
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast
