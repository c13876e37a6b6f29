"""From stored DICOM to the 8-bit grayscale image the model sees, recording every step.

RadVLM was trained on 8-bit JPEGs. Its own DICOM conversion is a plain min-max; this one
applies the Modality LUT, the VOI LUT or window the modality chose, inverts MONOCHROME1,
and scales to 8 bits at the original size, so that box coordinates normalised to the
model image are the same fractions of the original Columns and Rows.

LUTs are applied as PS3.3 C.11 defines them (an integer input indexes the table from the first
mapped value, clamped at both ends), whatever the VR of LUT Data (US, SS or OW). The size of an
image is checked from its header before anything is decoded, and only the first frame is decoded,
so one image never costs more than a few times its own size in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from pydicom.pixels import convert_color_space

from records.text import one_line

DEFAULT_MAX_MEGAPIXELS = 100.0  # a 4280x3520 detector is 15; a 65535x65535 header claims 4,295


class PixelError(ValueError):
    """The pixel data cannot be turned into a model image; the message (one bounded line) says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(one_line(reason))


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


def size_problem(ds: Dataset, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> str | None:
    """Why the header's image is too large to decode (Rows x Columns x frames x samples, counted at 16
    bits), or None. Read from the header only: a few kilobytes may claim gigabytes of pixels."""
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError) as exc:
        return f"image size unreadable: {exc}"
    megapixels = rows * columns * frames * samples * max(bits, 16) / 16 / 1e6
    if megapixels > max_megapixels:
        return (f"image too large: {rows} x {columns} x {frames} frame(s) x {samples} sample(s) at {bits} bits is "
                f"{megapixels:,.0f} megapixels, above the limit of {max_megapixels:g} "
                f"(node.max_image_megapixels)")
    return None


def read_lut(item: Dataset, little_endian: bool) -> tuple[int, np.ndarray]:
    """A LUT item's first mapped value and its table (each entry within the descriptor's bits), from LUT Data
    as US/SS values or OW bytes."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536  # PS3.3 C.11.1.1: 0 means 2^16
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        if len(data) == entries:  # 8-bit entries packed one per byte
            table = np.frombuffer(data, dtype=np.uint8)
        elif len(data) in (2 * entries, 2 * entries + 1):
            table = np.frombuffer(data[: 2 * entries], dtype="<u2" if little_endian else ">u2")
        else:
            raise PixelError(f"LUT Data holds {len(data)} bytes for {entries} entries")
    else:
        table = np.atleast_1d(np.asarray(data, dtype=np.int64))
    if table.size != entries:
        raise PixelError(f"LUT Data holds {table.size} values for {entries} entries")
    if bits < 16:
        table = table & ((1 << bits) - 1)  # entries beyond the descriptor's bits are not part of the value
    return first, table.astype(np.float32)


def little_endian(ds: Dataset) -> bool:
    """Whether OW bytes read from this dataset's file are little endian (a dataset made in memory: yes)."""
    return ds.original_encoding[1] is not False


def _apply_lut(values: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    """PS3.3 C.11.2.1.1: input x maps to table[x - first], clamped to the first and last entries."""
    index = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values.astype(np.int64)
    index -= first
    np.clip(index, 0, table.size - 1, out=index)
    return table[index]


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2-3 (LINEAR, LINEAR_EXACT, SIGMOID) onto 0..1, in place where it can."""
    out = values.astype(np.float32, copy=values.dtype != np.float32)
    if function == "SIGMOID":
        out -= center
        out *= -4.0 / width
        np.exp(out, out=out)
        out += 1.0
        np.reciprocal(out, out=out)
        return out
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise PixelError(f"window width {width:g} is not positive")
        out -= center
        out /= width
    else:
        if width < 1:
            raise PixelError(f"window width {width:g} is below 1")
        out -= center - 0.5
        out /= max(width - 1.0, 1e-6)
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def _first(value: object) -> float:
    """The first of a multi-valued DS (several windows: the modality's first choice)."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _grayscale(arr: np.ndarray, ds: Dataset, steps: list[str]) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return arr
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        if photometric.startswith("YBR"):
            arr = convert_color_space(arr, photometric, "RGB")
        steps.append(f"{photometric} to luminance")
        return arr[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    raise PixelError(f"unsupported PhotometricInterpretation {photometric or 'missing'}")


def _modality(arr: np.ndarray, ds: Dataset, steps: list[str]) -> np.ndarray:
    """The Modality LUT (a table, or rescale slope and intercept); integers stay integers."""
    if ds.get("ModalityLUTSequence"):
        first, table = read_lut(ds.ModalityLUTSequence[0], little_endian(ds))
        steps.append("modality LUT table")
        return _apply_lut(arr, first, table)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        steps.append(f"modality LUT: rescale slope {slope:g} intercept {intercept:g}")
        if slope == 1 and intercept == int(intercept) and arr.dtype.kind in "iu":
            return arr.astype(np.int64) + int(intercept)
        out = arr.astype(np.float32)
        out *= slope
        out += intercept
        return out
    return arr


def _voi(values: np.ndarray, ds: Dataset, steps: list[str], padded: np.ndarray | None) -> np.ndarray:
    """Apply the VOI transform; return the values scaled to 0..1 (before MONOCHROME1 inversion)."""
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        first, table = read_lut(item, little_endian(ds))
        out = _apply_lut(values, first, table)
        low, high = 0.0, float((1 << int(item.LUTDescriptor[2])) - 1)  # PS3.3 C.11.2.1.1: the LUT's output range
        steps.append(f"VOI LUT {str(item.get('LUTExplanation', '') or '#1').strip()}")
    elif ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        steps.append(f"window center {center:g} width {width:g} ({function})")
        return _window(values, center, width, function)
    else:
        out = values.astype(np.float32)
        imaged = out if padded is None else out[~padded]  # padding is no data: it sets no range
        low, high = (float(imaged.min()), float(imaged.max())) if imaged.size else (0.0, 0.0)
        steps.append("no VOI in header: full data range")
    if not high > low:
        raise PixelError("image has no contrast after the VOI transform")
    out = out.astype(np.float32, copy=False)
    out -= low
    out /= high - low
    return np.clip(out, 0.0, 1.0, out=out)


def model_image(ds: Dataset, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> ModelImage:
    """Decode ``ds`` (any accepted transfer syntax) and return the 8-bit model image.

    Whatever the header makes of the transforms (a wrong VR, an impossible LUT) is this image's
    ``PixelError``, never an exception that stops the caller.
    """
    try:
        return _model_image(ds, max_megapixels)
    except PixelError:
        raise
    except Exception as exc:
        raise PixelError(f"cannot apply the header's pixel transforms: {type(exc).__name__}: {exc}") from exc


def _model_image(ds: Dataset, max_megapixels: float) -> ModelImage:
    if "PixelData" not in ds:
        raise PixelError("no pixel data")
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows < 1 or columns < 1:
        raise PixelError(f"invalid size {rows}x{columns}")
    problem = size_problem(ds, max_megapixels)
    if problem:
        raise PixelError(problem)
    steps: list[str] = [f"decoded {ds.file_meta.TransferSyntaxUID.name}" if "TransferSyntaxUID" in
                        getattr(ds, "file_meta", {}) else "decoded"]
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        if frames > 1:
            ds.pixel_array_options(index=0)  # decode the first frame only
        arr = ds.pixel_array
    except Exception as exc:  # any decoder failure is a property of this instance's data
        raise PixelError(f"cannot decode pixel data: {type(exc).__name__}: {exc}") from exc
    if frames > 1:
        steps.append("first frame of a multi-frame image")
    arr = _grayscale(arr, ds, steps)
    if arr.shape[:2] != (rows, columns):
        raise PixelError(f"decoded shape {arr.shape} does not match {rows}x{columns}")
    padding = ds.get("PixelPaddingValue")
    padded = None
    if padding is not None and arr.dtype.kind in "iu" and ds.get("PhotometricInterpretation") in (
            "MONOCHROME1", "MONOCHROME2"):
        padded = arr == int(padding)  # outside the imaged area: shown black, whatever the transforms make of it
        if not padded.any():
            padded = None
        else:
            steps.append("pixel padding shown black")
    scaled = _voi(_modality(arr, ds, steps), ds, steps, padded)
    del arr
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        np.subtract(1.0, scaled, out=scaled)
        steps.append("MONOCHROME1 inverted")
    scaled *= 255.0
    pixels = np.rint(scaled, out=scaled).astype(np.uint8)
    if padded is not None:
        pixels[padded] = 0
    steps.append(f"scaled to 8 bits, {columns}x{rows} kept")
    return ModelImage(pixels=pixels, rows=rows, columns=columns, steps=steps)


def read_dataset(path: Path) -> Dataset:
    """Read a stored file with its pixel data; any reading failure is a ``PixelError``."""
    try:
        return dcmread(path)
    except Exception as exc:
        raise PixelError(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc


def read_model_image(path: Path, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> ModelImage:
    """Read a stored file and return its model image; any failure is a ``PixelError``."""
    return model_image(read_dataset(path), max_megapixels)


def model_picture(pixels: np.ndarray) -> Image.Image:
    """The RGB picture a processor takes: the 8-bit gray image in all three channels."""
    return Image.fromarray(pixels, mode="L").convert("RGB")
