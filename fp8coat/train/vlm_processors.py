"""HF processors for the VLM presets, built in code (no downloads, no torchvision).

* LLaVA: ``LlavaProcessor`` with ``CLIPImageProcessorPil`` (resize the shortest edge to ``image_size`` with bicubic
  resampling, center crop ``image_size × image_size``, rescale to [0, 1], normalize with CLIP's mean and std):
  ``pixel_values`` ``float32 (1, 3, S, S)`` per image and ``(S / P)²`` image tokens (the CLS token is dropped:
  ``vision_feature_select_strategy="default"``, ``num_additional_image_tokens=1``).
* Qwen2-VL: :class:`Qwen2VLImageOnlyProcessor` with ``Qwen2VLImageProcessorPil`` (``min_pixels = max_pixels =
  S²``: an image is resized to about ``S²`` pixels with sides that are multiples of ``P · merge``; a square one to
  ``S × S``), normalized with CLIP's mean and std: ``pixel_values`` ``float32 (patches, 3 · 2 · P · P)``,
  ``image_grid_thw`` ``int64 (1, 3)`` = ``(1, S / P, S / P)`` and ``(S / P)² / merge²`` image tokens.

The tokenizer is :func:`fp8coat.train.data.vlm_tokenizer.vlm_tokenizer`'s (or any ``PreTrainedTokenizerFast``
holding the family's special tokens); the processor's chat template writes the texts the data pipeline trains on
(:data:`fp8coat.train.data.chat_format.CHAT_TEMPLATES`).
"""

from __future__ import annotations

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from .data.chat_format import CHAT_TEMPLATES

__all__ = ["Qwen2VLImageOnlyProcessor", "llava_processor", "qwen2vl_processor"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalization, also Qwen2-VL's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images only: no video processor, which needs torchvision. Expands
    ``<|image_pad|>`` into ``image_grid_thw.prod() / merge_size²`` tokens and returns ``mm_token_type_ids``, as
    ``Qwen2VLProcessor`` does."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = None
        self.video_token_id = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def llava_processor(tokenizer, image_size: int, patch_size: int):
    """A ``LlavaProcessor`` for ``image_size``-pixel square inputs and ``patch_size``-pixel patches."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    from transformers.image_utils import PILImageResampling

    _check_grid(image_size, patch_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True, resample=PILImageResampling.BICUBIC, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>", chat_template=CHAT_TEMPLATES["llava"])


def qwen2vl_processor(tokenizer, image_size: int, patch_size: int, merge_size: int = 2):
    """A :class:`Qwen2VLImageOnlyProcessor` resizing images to about ``image_size²`` pixels."""
    from transformers import Qwen2VLImageProcessorPil

    _check_grid(image_size, patch_size * merge_size)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=image_size * image_size, max_pixels=image_size * image_size, patch_size=patch_size,
        temporal_patch_size=2, merge_size=merge_size, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    return Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=CHAT_TEMPLATES["qwen2-vl"])


def _check_grid(image_size: int, unit: int) -> None:
    if image_size < unit or image_size % unit:
        raise ValueError(f"image size {image_size} is not a multiple of {unit} pixels")
