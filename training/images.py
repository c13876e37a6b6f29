"""Training images as the service's model sees them: 8-bit grayscale at the original size.

DICOM goes through the node's own conversion (Modality LUT, VOI LUT or window, MONOCHROME1
inverted: ``records.pixels``), so a model fine-tuned on a hospital's DICOM learns from the
pixels it will later be shown. JPEG and PNG are read as they are; 16-bit PNGs (PadChest) are
scaled to 8 bits from their own range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from records.pixels import model_picture, read_model_image
from training.sources.files import DICOM_SUFFIXES


def gray_pixels(path: Path) -> np.ndarray:
    """uint8 (rows, columns) of the image at ``path``."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_model_image(path).pixels
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            values = np.asarray(image, dtype=np.float64)
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
            return np.rint(scaled * 255.0).astype(np.uint8)
        return np.asarray(image.convert("L"), dtype=np.uint8)


def load(path: Path) -> Image.Image:
    """The image at ``path`` as the processor takes it: the model's 8-bit gray view, in RGB."""
    return model_picture(gray_pixels(path))
