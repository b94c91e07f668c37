"""Copied into a saved tiny Qwen3.5 folder so `transformers serve` can load its processor.

Qwen's own processor class always builds a video processor, which needs torchvision (absent beside
the CPU torch wheel); declaring no video processor in the signature makes it image-only. Loaded by
`transformers serve --trust-remote-code` from the test's own temporary folder, nowhere else.
"""

from transformers import Qwen3VLProcessor


class ImageOnlyQwenVLProcessor(Qwen3VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: ANN001, ANN003, ANN204
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)
