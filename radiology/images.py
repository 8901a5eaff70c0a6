"""Images, the ground floor: the error every image reader raises, and conversion to 8-bit RGB.

``radiology.dicom`` (DICOM rendering) and ``radiology.data`` (datasets, which read DICOM through
``radiology.dicom``) both build on this module; it imports neither.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageDecodeError", "ImageNotFoundError", "to_rgb"]


class ImageDecodeError(ValueError):
    """An image that cannot be read; the message names the cause."""

    # The short label under which a dropped row is counted (subclasses name their cause).
    reason = "unreadable image"


class ImageNotFoundError(ImageDecodeError):
    """An image path that names no file: a wrong path or column, not a damaged image."""

    reason = "file not found"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image (grayscale, 16-bit, float, palette, alpha, CMYK...) as 8-bit RGB.

    High-bit-depth grayscale is stretched from its own min..max to 0..255: a 12/16-bit radiograph
    stored as PNG/TIFF would otherwise clip to white under Pillow's plain conversion. Transparent
    areas are composited onto black, the background of radiographs.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = ((pixels - low) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
