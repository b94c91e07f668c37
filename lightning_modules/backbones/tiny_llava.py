"""A tiny random LLaVA (CLIP vision tower + Llama decoder) with an offline tokenizer and processor.

For tests and demos of the captioning pipeline: its captions are noise, what it exercises is the
real code path (processor, chat template with an image slot, generate, decode, save/load by path).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .tokenizer import build_word_tokenizer
from .vocabulary import llava_words

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tiny_llava(image_size: int = 32, patch_size: int = 8, width: int = 32, layers: int = 2,
                     seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tokenizer = build_word_tokenizer(llava_words(), extra_special_tokens=[IMAGE_TOKEN], model_max_length=1024,
                                     add_bos_eos=False)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                       num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=image_token_id, image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )
    return model, processor


def save_tiny_llava(folder: Any, **kw: Any) -> None:
    model, processor = build_tiny_llava(**kw)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
