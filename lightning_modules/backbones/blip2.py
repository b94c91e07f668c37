"""BLIP-2 (ViT + Q-Former, Hugging Face ``Blip2ForImageTextRetrieval``) behind the passes that
sentence-level prompting needs (SPRC, and LLaVA-caption CIR's prompted query text).

Every pass is one Q-Former forward:

- image memory: the ViT's patch embeddings after its final LayerNorm (LAVIS's ``ln_vision``); the
  patches of several views of a product lie side by side, padded views masked out;
- sentence-level prompt: the learned query tokens and the text together, the queries
  cross-attending to the memory; the query part of the output is the prompt;
- text passes (``TextBranch``), no image: the prompt followed by the text (the feature is taken at the
  text's first token, right after the prompt), or the text alone, optionally with prefix tokens
  after its first token;
- target tokens: the query tokens alone cross-attending to the memory, one vector per query token.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, Blip2Config, Blip2ForImageTextRetrieval, PreTrainedTokenizerBase
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from .clip import HFImageTransform
from .fast_transforms import BACKBONE_KEY, Preprocessing, check_preprocessing
from .registry import checkpoint_source, get_preset, hub_kwargs, load_error
from .tokenizer import BOS, EOS, build_word_tokenizer
from .vocabulary import clip_words


def tiny_tokenizer(max_length: int) -> PreTrainedTokenizerBase:
    """The generated vocabulary, word-level; BOS and EOS play BERT's [CLS] and [SEP] (BOS opens every
    text, so position 0 is the [CLS] that BLIP-2 reads its text feature from)."""
    tok = build_word_tokenizer(clip_words(), model_max_length=max_length)
    tok.add_special_tokens({"cls_token": BOS, "sep_token": EOS})
    return tok


class TextBranch(nn.Module):
    """The Q-Former's text passes (no image): word and position embeddings, the Q-Former, the text
    projection. The backbone's own branch shares its modules; ``copy`` makes an independent one
    (SPN4CIR's stage 2 trains such a copy while the original stays frozen)."""

    def __init__(self, embeddings: nn.Module, qformer: nn.Module, projection: nn.Linear) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.qformer = qformer
        self.projection = projection

    def copy(self) -> TextBranch:
        """A trainable deep copy. Cross-attention and the query feed-forward layers never run in a text
        pass: they stay frozen, so DDP never waits for gradients they cannot get."""
        twin = copy.deepcopy(self)
        twin.requires_grad_(True)
        for name, p in twin.qformer.named_parameters():
            if "crossattention" in name or "_query" in name:
                p.requires_grad_(False)
        return twin

    def _encode(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # query_length=0: every token takes the text feed-forward layers and nothing cross-attends.
        return self.qformer(query_embeds=embeds, query_length=0, attention_mask=mask).last_hidden_state

    def fuse(self, prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[prompt; text] → the projected, L2-normalised feature at the text's first token ``[B, dim]``."""
        q = prompt.shape[1]
        embeds = self.embeddings(input_ids=input_ids, query_embeds=prompt)  # positions count from the text
        mask = torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)
        hidden = self._encode(embeds, mask)[:, q]
        return F.normalize(self.projection(hidden.to(self.projection.weight.dtype)), dim=-1)

    def text_feature(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
        """The text alone (``prefix`` tokens ``[P, H]`` inserted after its first token, all positions
        counted) → the projected, L2-normalised feature at position 0 ``[B, dim]``."""
        words = self.embeddings.word_embeddings(input_ids)
        mask = attention_mask
        if prefix is not None:
            b = words.shape[0]
            words = torch.cat([words[:, :1], prefix.to(words.dtype).expand(b, -1, -1), words[:, 1:]], dim=1)
            mask = torch.cat([mask[:, :1], mask.new_ones(b, prefix.shape[0]), mask[:, 1:]], dim=1)
        positions = self.embeddings.position_ids[:, : words.shape[1]]
        embeds = words + self.embeddings.position_embeddings(positions)
        hidden = self._encode(embeds, mask)[:, 0]
        return F.normalize(self.projection(hidden.to(self.projection.weight.dtype)), dim=-1)


class Blip2Backbone(nn.Module):
    """BLIP-2's ViT and Q-Former with its projections (``Blip2ForImageTextRetrieval``).

    Args:
        name_or_path: a preset name (``tiny``, ``blip2-itm-vit-g``), a hub id or a local folder
            written by ``save_pretrained``.
        max_text_length: texts are truncated and padded to this many tokens (SPRC: 32).
        trust_remote_code: passed to ``from_pretrained``; off unless you trust the source.
        preprocessing: how ``image_transform`` turns views into pixels: ``fast`` (the default, for
            training throughput) or ``exact`` (the processor's own values, for reproducing reported numbers).
    """

    def __init__(self, name_or_path: str = "tiny", max_text_length: int = 32, trust_remote_code: bool = False,
                 preprocessing: Preprocessing = "fast") -> None:
        super().__init__()
        self.name_or_path = name_or_path
        self.preprocessing = check_preprocessing(preprocessing, BACKBONE_KEY)
        self.max_text_length = max_text_length
        preset = get_preset("blip2", name_or_path)
        if preset is not None and preset.random_init:
            cfg = preset.config
            self.tokenizer = tiny_tokenizer(cfg["qformer"]["max_position_embeddings"])
            qformer = dict(cfg["qformer"], vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id)
            top = {k: v for k, v in cfg.items() if k not in ("vision", "qformer")}
            config = Blip2Config(vision_config=cfg["vision"], qformer_config=qformer, **top)
            self.model = Blip2ForImageTextRetrieval(config)
            # transformers starts the query tokens at zero (weights are loaded over them); identical
            # queries would stay identical, so a random model draws them as LAVIS does.
            nn.init.normal_(self.model.query_tokens, std=config.qformer_config.initializer_range)
            size = preset.image_size
            self.processor = BlipImageProcessorPil(size={"height": size, "width": size})
        else:
            source = checkpoint_source("blip2", name_or_path)
            try:
                hub = hub_kwargs(source)
                self.model = Blip2ForImageTextRetrieval.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                                        **hub)
                self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
                self.processor = BlipImageProcessorPil.from_pretrained(source, **hub)
            except OSError as exc:
                raise load_error("the BLIP-2 backbone", source, exc) from exc
            self.model.train()  # from_pretrained returns eval mode; this module is built to be trained
        qformer = self.model.config.qformer_config
        problems = [] if qformer.use_qformer_text_input else [
            f"{name_or_path!r} has a Q-Former without text layers (use_qformer_text_input is off): use an "
            "image-text retrieval checkpoint such as Salesforce/blip2-itm-vit-g"]
        if not 1 <= max_text_length <= qformer.max_position_embeddings:
            problems.append(f"max_text_length={max_text_length}: must be 1 to the Q-Former's "
                            f"{qformer.max_position_embeddings} positions")
        if problems:
            raise ValueError("backbone.init_args: " + "; ".join(problems))
        # The image-text matching head is never used here; a trainable unused parameter would leave
        # DDP's gradient buckets unreduced.
        self.model.itm_head.requires_grad_(False)

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Width of the projected features (query, text and target tokens)."""
        return int(self.model.config.image_text_hidden_size)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.qformer_config.hidden_size)

    @property
    def num_query_tokens(self) -> int:
        return int(self.model.config.num_query_tokens)

    @property
    def initializer_range(self) -> float:
        return float(self.model.config.qformer_config.initializer_range)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def image_transform(self) -> HFImageTransform:
        return HFImageTransform(self.processor, self.preprocessing)

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    # -- inputs ------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[B, max_text_length]``, padded to the full length as SPRC does."""
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_text_length,
                             return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` → ViT patch embeddings ``[N, P, Dv]``; pixels of another size than the
        ViT's (another backbone's preprocessing) are resized to it first."""
        size = self.image_size
        if pixel_values.shape[-2:] != (size, size):
            pixel_values = F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def view_memory(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, V, 3, H, W]`` views → the patches of every real view side by side ``[B, V·P, Dv]`` and
        their mask ``[B, V·P]``; every real view goes through the ViT in one batch."""
        b, v = mask.shape
        embeds = self.image_embeds(images[mask])
        p, d = embeds.shape[1:]
        memory = embeds.new_zeros(b, v, p, d)
        memory[mask] = embeds
        memory_mask = mask[:, :, None].expand(b, v, p).reshape(b, v * p).long()
        return memory.reshape(b, v * p, d), memory_mask

    # -- passes with the image ---------------------------------------------------------------------
    def _queries(self, n: int) -> torch.Tensor:
        return self.model.query_tokens.expand(n, -1, -1)

    @staticmethod
    def _cross_mask(memory_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The memory mask as a ready additive ``[B, 1, 1, M]`` mask (None when nothing is padded).
        A 2-D mask would be expanded to the length of queries *and* text, while only the queries
        cross-attend (transformers then fails on a padded memory)."""
        if bool(memory_mask.all()):
            return None
        return (1.0 - memory_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def sentence_prompt(self, memory: torch.Tensor, memory_mask: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """Query tokens + text, the queries cross-attending to the image memory → the query part of
        the output, the sentence-level prompt ``[B, Q, H]``."""
        queries = self._queries(memory.shape[0])
        q = queries.shape[1]
        embeds = self.model.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([attention_mask.new_ones(queries.shape[:2]), attention_mask], dim=1)
        out = self.model.qformer(query_embeds=embeds, query_length=q, attention_mask=mask,
                                 encoder_hidden_states=memory,
                                 encoder_attention_mask=self._cross_mask(memory_mask, memory.dtype))
        return out.last_hidden_state[:, :q]

    def target_tokens(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """Query tokens alone cross-attending to the image memory → projected, per-token
        L2-normalised target vectors ``[B, Q, dim]``."""
        queries = self._queries(memory.shape[0])
        out = self.model.qformer(query_embeds=queries, query_length=queries.shape[1], encoder_hidden_states=memory,
                                 encoder_attention_mask=self._cross_mask(memory_mask, memory.dtype))
        hidden = out.last_hidden_state.to(self.model.vision_projection.weight.dtype)
        return F.normalize(self.model.vision_projection(hidden), dim=-1)

    def text_branch(self) -> TextBranch:
        """The text passes on this backbone's own modules (built on demand, so its modules are not
        registered twice)."""
        return TextBranch(self.model.embeddings, self.model.qformer, self.model.text_projection)

    def prompted_query(self, images: torch.Tensor, mask: torch.Tensor, texts: list[str],
                       branch: TextBranch | None = None) -> torch.Tensor:
        """Reference views + text → sentence-level prompt → [prompt; text] fused feature ``[B, dim]``
        (L2-normalised); ``branch``: the text passes to fuse with (default: this backbone's)."""
        ids, text_mask = self.tokenize(texts)
        prompt = self.sentence_prompt(*self.view_memory(images, mask), ids, text_mask)
        return (branch or self.text_branch()).fuse(prompt, ids, text_mask)

    def save_pretrained(self, folder: str | Path) -> None:
        """Model, tokenizer and preprocessor in one folder, loadable with ``Blip2Backbone(folder)``."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.processor.save_pretrained(folder)
