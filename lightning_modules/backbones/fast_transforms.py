"""The Hugging Face PIL image processors' preprocessing (CLIP / BLIP resize + crop + normalise, and
Qwen2-VL's smart resize + normalise + patchify), computed from the processor's own settings but
several times faster.

Why the processors are slow on full-size product photos: they resize the fully decoded image with
PIL's bicubic filter (its cost grows with the input size) and normalise in float64 through several
array passes. Here, in ``fast`` mode:

- the output geometry (resize target, crop, Qwen's patch grid) is computed from the view's
  full-size header dimensions exactly as the processor computes it, so shapes and ``grid_thw``
  never change;
- a JPEG view is decoded in the DCT domain at the smallest reduction whose extent still covers
  that target (``datamodules.fast_decode``);
- the resize is torch's antialiased uint8 kernel (the same filters as PIL's, with PIL's bicubic
  coefficient, vectorised), given the exact scale of the decoded region so a partly covered last
  pixel does not shift the picture;
- rescale + normalise is one affine map per channel, applied once in float32, and Qwen's patches
  are cut from the uint8 image with one reshape/permute before it.

``exact`` mode decodes at full size and resizes with PIL as the processors do: equal to them
within float32 rounding (≤ 1e-5). Settings this module does not reproduce (no resize, padding,
a crop larger than the resized image, longest-edge caps) make the functions return None, and the
callers fall back to the processor itself.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from datamodules.fast_decode import Decoded, decode_at_least

Preprocessing = Literal["fast", "exact"]
PREPROCESSING: tuple[Preprocessing, ...] = ("fast", "exact")
BACKBONE_KEY = "backbone.init_args.preprocessing"  # where a config sets it, whichever model holds the backbone

# torch's antialiased kernels for PIL's filters (both use PIL's support and, for bicubic, a = -0.5).
_TORCH_FILTERS = {
    Image.Resampling.BICUBIC: torch.ops.aten._upsample_bicubic2d_aa,
    Image.Resampling.BILINEAR: torch.ops.aten._upsample_bilinear2d_aa,
}


def check_preprocessing(value: object, where: str = "preprocessing") -> Preprocessing:
    """``value`` when it names a mode, else a one-line error: any other string would otherwise fall
    through to the ``fast`` branches silently (``Exact`` would not be exact)."""
    if value not in PREPROCESSING:
        raise ValueError(f"{where}={value!r}: choose 'fast' (uint8, reduced JPEG decoding; the default) "
                         "or 'exact' (equal to the Hugging Face processor, for reproducing reported numbers)")
    return cast(Preprocessing, value)


def pixel_affine(processor: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (scale, shift) with ``uint8 · scale + shift`` = the processor's rescale then
    normalise; None when it does neither (it then returns raw uint8 values)."""
    if not processor.do_rescale and not processor.do_normalize:
        return None
    rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0
    mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else (0.0, 1.0)
    return _affine(rescale, tuple(np.broadcast_to(mean, 3).tolist()), tuple(np.broadcast_to(std, 3).tolist()))


@functools.lru_cache(maxsize=32)
def _affine(rescale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # Settings are read on every call (a processor may be changed after its transform was made);
    # the tensors are made once per distinct setting. Callers never modify them.
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return torch.from_numpy(rescale / s).float(), torch.from_numpy(-m / s).float()


def rgb(img: Image.Image) -> Image.Image:
    """RGB as the processors convert: transparency composited onto white."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def resize_u8(decoded: Decoded, width: int, height: int, resample: int, mode: Preprocessing) -> torch.Tensor:
    """``decoded``'s box resized to ``[height, width, 3]`` uint8."""
    img = rgb(decoded.image)
    x0, y0, x1, y1 = decoded.box
    kernel = _TORCH_FILTERS.get(Image.Resampling(resample))
    if mode == "exact" or kernel is None or x0 or y0:
        whole = decoded.box == (0, 0, img.width, img.height)
        return torch.from_numpy(np.array(img.resize((width, height), resample, box=None if whole else decoded.box)))
    # PIL stores RGB as 4 bytes a pixel: exporting them as they are is twice as fast as packing RGB,
    # and torch's uint8 kernel works on 4 channels inside anyway. The 4th is dropped after the resize.
    rgbx = torch.frombuffer(bytearray(img.tobytes("raw", "RGBX")), dtype=torch.uint8)
    x = rgbx.view(1, img.height, img.width, 4).permute(0, 3, 1, 2)  # [1, 4, h, w], channels-last in memory
    out = kernel(x, [height, width], False, height / y1, width / x1)
    return out[0, :3].permute(1, 2, 0)


def normalise_chw(pixels: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[H, W, C]`` uint8 → ``[C, H, W]`` float32 through the per-channel affine map."""
    scale, shift = affine
    # Planar uint8 first: the strided gather then moves bytes, not floats.
    return pixels.permute(2, 0, 1).contiguous().float().mul_(scale[:, None, None]).add_(shift[:, None, None])


def patchify(pixels: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor], patch: int, merge: int,
             temporal: int) -> torch.Tensor:
    """``[H, W, C]`` uint8 → Qwen2-VL's ``[patches, C·T·P·P]`` float32: patches in merge-window order
    (window row, window column, row in window, column in window), each flattened as (channel, frame,
    row, column) with the single image repeated over the ``temporal`` frames."""
    h, w, c = pixels.shape
    gh, gw = h // patch, w // patch
    # Windows are cut from the planar uint8 image (rows of `patch` contiguous bytes) straight into
    # the first frame while scaling; the other frames are copies of it.
    planar = pixels.permute(2, 0, 1).contiguous()
    windows = planar.view(c, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    scale, shift = affine
    out = torch.empty(gh // merge, gw // merge, merge, merge, c, temporal, patch, patch, dtype=torch.float32)
    first = out[:, :, :, :, :, 0]
    torch.mul(windows, scale[:, None, None], out=first).add_(shift[:, None, None])
    for t in range(1, temporal):
        out[:, :, :, :, :, t].copy_(first)
    return out.view(gh * gw, c * temporal * patch * patch)


def _resample(processor: Any) -> int:
    """The processor's filter; the PIL backend resizes with bilinear when none is set."""
    return Image.Resampling.BILINEAR if processor.resample is None else processor.resample


def _decode(view: Image.Image, width: int, height: int, mode: Preprocessing) -> Decoded:
    if mode == "fast":
        return decode_at_least(view, width, height)
    return Decoded(view, (0.0, 0.0, float(view.width), float(view.height)))


def _resize_target(size: Any, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) the processor resizes a ``width × height`` image to, for the size settings
    reproduced here (shortest edge with the aspect ratio kept, or a fixed height and width)."""
    if size.get("shortest_edge") and not size.get("longest_edge"):
        edge = int(size["shortest_edge"])
        short, long = min(width, height), max(width, height)
        new_long = int(edge * long / short)
        return (edge, new_long) if width <= height else (new_long, edge)
    if size.get("height") and size.get("width") and not size.get("shortest_edge"):
        return int(size["width"]), int(size["height"])
    return None


def clip_pixels(view: Image.Image, processor: Any, mode: Preprocessing = "fast") -> torch.Tensor | None:
    """``[3, H, W]`` pixel values of a CLIP / BLIP style processor (resize, optional centre crop,
    rescale, normalise), or None for settings not reproduced here."""
    affine = pixel_affine(processor)
    target = _resize_target(processor.size, *view.size) if processor.do_resize else None
    if affine is None or target is None or processor.do_pad or (not processor.do_convert_rgb and view.mode != "RGB"):
        return None
    tw, th = target
    crop_size = processor.crop_size
    crop = (int(crop_size.get("width")), int(crop_size.get("height"))) if processor.do_center_crop else None
    if crop is not None and (crop[0] > tw or crop[1] > th):
        return None  # the processor pads such a crop; rare enough to leave to it
    pixels = resize_u8(_decode(view, tw, th, mode), tw, th, _resample(processor), mode)
    if crop is not None:
        top, left = (th - crop[1]) // 2, (tw - crop[0]) // 2
        pixels = pixels[top: top + crop[1], left: left + crop[0]]
    return normalise_chw(pixels, affine)


def qwen_patches(view: Image.Image, processor: Any,
                 mode: Preprocessing = "fast") -> tuple[torch.Tensor, torch.Tensor] | None:
    """Qwen2-VL's (``pixel_values`` ``[patches, C·T·P·P]``, ``grid_thw`` ``[3]``) for one view, or
    None for settings not reproduced here."""
    affine = pixel_affine(processor)
    lo, hi = processor.size.get("shortest_edge"), processor.size.get("longest_edge")
    if affine is None or not (processor.do_resize and lo and hi) or view.mode != "RGB":
        return None
    patch, merge, temporal = int(processor.patch_size), int(processor.merge_size), int(processor.temporal_patch_size)
    th, tw = smart_resize(view.height, view.width, factor=patch * merge, min_pixels=lo, max_pixels=hi)
    pixels = resize_u8(_decode(view, tw, th, mode), tw, th, _resample(processor), mode)
    grid = torch.tensor([1, th // patch, tw // patch], dtype=torch.int64)
    return patchify(pixels, affine, patch, merge, temporal), grid
