"""From stored DICOM to the 8-bit grayscale image the model sees, recording every step.

RadVLM was trained on 8-bit JPEGs. Its own DICOM conversion is a plain min-max; this one
applies the Modality LUT, the VOI LUT or window the modality chose, inverts MONOCHROME1,
and scales to 8 bits at the original size, so that box coordinates normalised to the
model image are the same fractions of the original Columns and Rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space


class PixelError(ValueError):
    """The pixel data cannot be turned into a model image; the message says why."""


@dataclass(frozen=True)
class ModelImage:
    """The model's input and how it maps back to the original pixel grid."""

    pixels: np.ndarray  # uint8, shape (rows, columns)
    rows: int
    columns: int
    steps: list[str] = field(default_factory=list)

    def to_pixels(self, x_norm: float, y_norm: float) -> tuple[float, float]:
        """A point normalised to [0, 1] of the model image, in (column, row) pixels of the original."""
        return x_norm * self.columns, y_norm * self.rows


def _grayscale(arr: np.ndarray, ds: Dataset, steps: list[str]) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return arr
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        if photometric.startswith("YBR"):
            arr = convert_color_space(arr, photometric, "RGB")
        steps.append(f"{photometric} to luminance")
        return arr[..., :3] @ np.array([0.299, 0.587, 0.114])
    raise PixelError(f"unsupported PhotometricInterpretation {photometric or 'missing'}")


def _voi(arr: np.ndarray, ds: Dataset, steps: list[str]) -> tuple[np.ndarray, float, float]:
    """Apply the VOI transform; return the values and the output range that maps to 0..255."""
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        out = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
        lut = np.asarray(item.LUTData, dtype=np.float64)
        steps.append(f"VOI LUT {str(item.get('LUTExplanation', '') or '#1').strip()}")
        return out, float(lut.min()), float(lut.max())
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        out = apply_voi_lut(arr, ds, index=0, prefer_lut=False)
        # pydicom clamps to its output range outside the window: read the range off the extremes.
        low, high = apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0, prefer_lut=False)
        center, width = (v[0] if isinstance(v, (list, tuple)) or getattr(v, "VM", 1) > 1 else v
                         for v in (ds.WindowCenter, ds.WindowWidth))
        function = str(ds.get("VOILUTFunction", "LINEAR"))
        steps.append(f"window center {float(center):g} width {float(width):g} ({function})")
        return out, float(min(low, high)), float(max(low, high))
    low, high = float(arr.min()), float(arr.max())
    steps.append("no VOI in header: full data range")
    return arr.astype(np.float64), low, high


def model_image(ds: Dataset) -> ModelImage:
    """Decode ``ds`` (any accepted transfer syntax) and return the 8-bit model image.

    Whatever the header makes of the transforms (a wrong VR, an impossible LUT) is this image's
    ``PixelError``, never an exception that stops the caller.
    """
    try:
        return _model_image(ds)
    except PixelError:
        raise
    except Exception as exc:
        raise PixelError(f"cannot apply the header's pixel transforms: {type(exc).__name__}: {exc}") from exc


def _model_image(ds: Dataset) -> ModelImage:
    if "PixelData" not in ds:
        raise PixelError("no pixel data")
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows < 1 or columns < 1:
        raise PixelError(f"invalid size {rows}x{columns}")
    steps: list[str] = [f"decoded {ds.file_meta.TransferSyntaxUID.name}" if "TransferSyntaxUID" in
                        getattr(ds, "file_meta", {}) else "decoded"]
    try:
        arr = ds.pixel_array
    except Exception as exc:  # any decoder failure is a property of this instance's data
        raise PixelError(f"cannot decode pixel data: {type(exc).__name__}: {exc}") from exc
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
        steps.append("first frame of a multi-frame image")
    arr = _grayscale(arr, ds, steps)
    if arr.shape[:2] != (rows, columns):
        raise PixelError(f"decoded shape {arr.shape} does not match {rows}x{columns}")

    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds:
        arr = apply_modality_lut(arr, ds)
        steps.append("modality LUT")
    values, low, high = _voi(arr, ds, steps)
    if not high > low:
        raise PixelError("image has no contrast after the VOI transform")
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
        steps.append("MONOCHROME1 inverted")
    pixels = np.rint(scaled * 255.0).astype(np.uint8)
    steps.append(f"scaled to 8 bits, {columns}x{rows} kept")
    return ModelImage(pixels=pixels, rows=rows, columns=columns, steps=steps)


def read_dataset(path: Path) -> Dataset:
    """Read a stored file with its pixel data; any reading failure is a ``PixelError``."""
    try:
        return dcmread(path)
    except Exception as exc:
        raise PixelError(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc


def read_model_image(path: Path) -> ModelImage:
    """Read a stored file and return its model image; any failure is a ``PixelError``."""
    return model_image(read_dataset(path))


def model_picture(pixels: np.ndarray) -> Image.Image:
    """The RGB picture a processor takes: the 8-bit gray image in all three channels."""
    return Image.fromarray(pixels, mode="L").convert("RGB")
