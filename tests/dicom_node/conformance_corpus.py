"""The conformance corpus: real radiographs no one here wrote (pydicom-data), and variants made from them,
each with the outcome the node must give it. ``CASES`` is the one table; ``tests/dicom_node/test_conformance.py``
sends every case through Orthanc (the PACS) and checks it.

Variants keep RG1's real pixel content (the chest PA of pydicom-data): downscaled by block means where the
case is not about size or coding, re-quantised or re-mapped where it is about a display transform, and
encoded by DCMTK (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``dcmconv``) or taken from pydicom-data's own
JPEG 2000 files where it is about a transfer syntax. Each variant has its own Study, Series and SOP
Instance UIDs, derived from its case id, so the same corpus is the same bytes on every run.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.data import get_testdata_files
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from testbed.radiographs import radiograph

Outcome = Literal["analysed", "skipped", "refused"]

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")

#: ``status`` of a case the node refuses at association: no presentation context for its SOP class,
#: so no C-STORE (and no DIMSE status) is ever exchanged.
NO_CONTEXT = -1

SMALL = 4  # the block-mean factor of the variants that are not about size or coding: 1955x1841 -> 488x460


@dataclass(frozen=True)
class Case:
    """One file the PACS sends, and what the node must make of it.

    ``expected``: ``analysed`` (selected, decoded, SR + GSPS back in the PACS for this image),
    ``skipped`` (stored, not analysed; the instance's selection reason or pixel error contains
    ``reason``), ``refused`` (C-STORE answered with one of ``status``, or ``NO_CONTEXT``: nothing
    stored).
    ``transfer_syntax``: the syntax the node must receive and record for the instance.
    ``study``: cases with the same key are one study, sent together (Orthanc sends every syntax here as
    it is: the node's row for the instance must name ``transfer_syntax``).
    ``lossless``: the node's model image must equal the uncompressed source's, pixel for pixel.
    ``display``: a display-transform case, also checked without the network against pydicom's LUTs.
    ``site``: cases whose SOP Instance UID another case already uses go to a second node and Orthanc.
    """

    case_id: str
    transfer_syntax: str
    expected: Outcome
    build: Callable[[], Dataset] = field(repr=False, compare=False)
    encode: Callable[[Dataset, Path], None] | None = field(default=None, repr=False, compare=False)
    source_file: Path | None = None
    reason: str = ""
    status: tuple[int, ...] = ()
    study: str = ""
    lossless: bool = False
    display: bool = False
    site: int = 0
    note: str = ""

    def write(self, folder: Path) -> Path:
        """The file to send, written into ``folder`` (a file of pydicom-data is copied as it is)."""
        path = folder / f"{self.case_id}.dcm"
        if self.source_file is not None:
            shutil.copyfile(self.source_file, path)
        else:
            assert self.encode is not None, self.case_id
            self.encode(self.build(), path)
        return path


# -- UIDs ---------------------------------------------------------------------------------------------------

def uid(*parts: str) -> str:
    """A UID derived from ``parts`` (pydicom's root): the same on every run."""
    return str(generate_uid(entropy_srcs=["radvlm-pacs conformance corpus", *parts]))


def identify(ds: Dataset, case_id: str, study: str, series: str | None = None) -> Dataset:
    """New Study, Series and SOP Instance UIDs for ``ds``: its case's, its study's, its series'."""
    ds.StudyInstanceUID = uid("study", study)
    ds.SeriesInstanceUID = uid("series", study, series or case_id)
    ds.SOPInstanceUID = uid("instance", case_id)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


# -- pixels ----------------------------------------------------------------------------------------------------

@cache
def _rg1_bytes() -> bytes:
    return radiograph("RG1_UNCR.dcm").read_bytes()  # the lossless original (RG1_J2KR decodes to it)


def rg1() -> Dataset:
    """A fresh copy of RG1_UNCR: CR, chest PA, 1955x1841, 15 bits stored, MONOCHROME1, window 15000/30000."""
    ds = pydicom.dcmread(io.BytesIO(_rg1_bytes()))
    if (0xFFFC, 0xFFFC) in ds:
        del ds[0xFFFC, 0xFFFC]  # trailing padding: a file-level artefact, not part of any variant
    return ds


def block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """``arr`` reduced by ``factor`` in both directions, each pixel the rounded mean of its block."""
    rows, columns = arr.shape[0] // factor, arr.shape[1] // factor
    blocks = arr[:rows * factor, :columns * factor].astype(np.float64).reshape(rows, factor, columns, factor)
    return np.rint(blocks.mean(axis=(1, 3)))


def set_pixels(ds: Dataset, arr: np.ndarray, bits_stored: int | None = None, bits_allocated: int = 16,
               signed: bool = False) -> Dataset:
    """Replace the image pixel data of ``ds`` with ``arr`` (native, little endian)."""
    bits_stored = bits_stored or int(ds.BitsStored)
    dtype = {(8, False): "u1", (8, True): "i1", (16, False): "<u2", (16, True): "<i2"}[(bits_allocated, signed)]
    values = np.asarray(arr)
    low, high = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    if values.min() < low or values.max() > high:
        raise ValueError(f"pixel values {values.min()}..{values.max()} exceed {bits_stored} bits")
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = values.astype(dtype).tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return ds


def small_rg1(factor: int = SMALL) -> Dataset:
    """RG1 downscaled by ``factor``: the real chest at a size that keeps the corpus fast."""
    ds = rg1()
    return set_pixels(ds, block_mean(ds.pixel_array, factor).astype(np.uint16))


# -- encodings -------------------------------------------------------------------------------------------------

def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr or result.stdout}")


def native(syntax: UID) -> Callable[[Dataset, Path], None]:
    """Write uncompressed in ``syntax`` (pydicom for little endian, DCMTK dcmconv for the others)."""
    def encode(ds: Dataset, path: Path) -> None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
            return
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
        if syntax == ExplicitVRBigEndian:
            _run("dcmconv", "+tb", str(path), str(path))
        elif syntax == DeflatedExplicitVRLittleEndian:
            _run("dcmconv", "+td", str(path), str(path))
        elif syntax != ExplicitVRLittleEndian:
            raise ValueError(f"not a native syntax: {syntax}")
    return encode


def dcmtk(tool: str, *options: str) -> Callable[[Dataset, Path], None]:
    """Compress with a DCMTK tool (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``), keeping the UIDs."""
    def encode(ds: Dataset, path: Path) -> None:
        native(ExplicitVRLittleEndian)(ds, path)
        _run(tool, *options, "+un", str(path), str(path))
    return encode


def pixel_data_of(name: str) -> Callable[[Dataset, Path], None]:
    """Take the encapsulated pixel data of a pydicom-data file (a codec no one here wrote) for ``ds``."""
    def encode(ds: Dataset, path: Path) -> None:
        coded = pydicom.dcmread(radiograph(name))
        ds.file_meta.TransferSyntaxUID = coded.file_meta.TransferSyntaxUID
        ds.PixelData = coded.PixelData
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in coded:
                setattr(ds, keyword, coded[keyword].value)
        ds.save_as(path, enforce_file_format=True)
    return encode


def as_is(ds: Dataset, path: Path) -> None:
    """Write ``ds`` in the syntax its file meta names (the pixel data is already in it)."""
    ds.save_as(path, enforce_file_format=True)


# -- variants --------------------------------------------------------------------------------------------------

def variant(case_id: str, base: Callable[[], Dataset] = small_rg1, study: str | None = None,
            series: str | None = None, **changes: object) -> Callable[[], Dataset]:
    """``base()`` with ``changes`` (an attribute set to None is removed) and the case's own UIDs."""
    def build() -> Dataset:
        ds = base()
        for keyword, value in changes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return identify(ds, case_id, study or case_id, series)
    return build


def rg1_bits(bits: int, full: bool = False) -> Callable[[], Dataset]:
    """Small (or ``full``-size) RG1 re-quantised to ``bits`` stored bits (8 in an 8-bit allocation), its
    window with it."""
    def build() -> Dataset:
        ds = rg1() if full else small_rg1()
        arr = ds.pixel_array.astype(np.int64)
        scale = 2.0 ** (bits - 15)
        arr = (arr << (bits - 15)) if bits > 15 else (arr >> (15 - bits))
        set_pixels(ds, arr, bits_stored=bits, bits_allocated=8 if bits == 8 else 16)
        ds.WindowCenter, ds.WindowWidth = round(15000 * scale), round(30000 * scale)
        return ds
    return build


def rg1_rescaled() -> Dataset:
    """Rescale Slope 2, Intercept -1000: the window moves into the output units with it."""
    ds = small_rg1()
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -1000, "US"
    ds.WindowCenter, ds.WindowWidth = 15000 * 2 - 1000, 30000 * 2
    return ds


def rg1_monochrome2() -> Dataset:
    """The same picture as MONOCHROME2: stored values and window mirrored in the 15-bit range."""
    ds = small_rg1()
    set_pixels(ds, 32767 - ds.pixel_array.astype(np.int64))
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter = 32767 - 15000
    return ds


def rg1_signed() -> Dataset:
    """Pixel Representation 1: the 15-bit values shifted into -16384..16383, the window with them."""
    ds = small_rg1()
    set_pixels(ds, ds.pixel_array.astype(np.int64) - 16384, signed=True)
    ds.WindowCenter = 15000 - 16384
    return ds


def rg1_padded() -> Dataset:
    """A 24-pixel border of Pixel Padding Value 32767: above every real value of RG1 (874..26479), at the
    end of the range that a MONOCHROME1 image displays black (the node shows padding black, whatever
    the window makes of it; here pydicom's window agrees)."""
    ds = small_rg1()
    arr = ds.pixel_array.copy()
    arr[:24, :], arr[-24:, :], arr[:, :24], arr[:, -24:] = 32767, 32767, 32767, 32767
    set_pixels(ds, arr)
    ds.PixelPaddingValue = 32767
    ds["PixelPaddingValue"].VR = "US"
    return ds


def _sigmoid_lut(entries: int, bits: int) -> np.ndarray:
    """A vendor-like sigmoid curve of ``entries`` values spanning 0..2**bits - 1 exactly."""
    x = np.linspace(-4.0, 4.0, entries)
    curve = 1.0 / (1.0 + np.exp(-x))
    curve = (curve - curve.min()) / (curve.max() - curve.min())
    return np.rint(curve * ((1 << bits) - 1)).astype(np.uint16)


def rg1_voi_lut(vr: Literal["US", "OW"]) -> Callable[[], Dataset]:
    """No window; a VOI LUT Sequence (16384 entries from 8000, 12-bit output), LUT Data as ``vr``."""
    def build() -> Dataset:
        ds = small_rg1()
        del ds.WindowCenter, ds.WindowWidth
        lut = _sigmoid_lut(16384, 12)
        item = Dataset()
        item.LUTDescriptor = [16384, 8000, 12]
        item["LUTDescriptor"].VR = "US"
        item.LUTExplanation = "SIGMOID 8000-24383"
        if vr == "US":
            item.add_new(0x00283006, "US", [int(v) for v in lut])
        else:
            item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())
        ds.VOILUTSequence = [item]
        return ds
    return build


def rg1_modality_lut() -> Dataset:
    """A Modality LUT Sequence (16384 entries from 8000, 16-bit output) and a window in its output units."""
    ds = small_rg1()
    item = Dataset()
    item.LUTDescriptor = [16384, 8000, 16]
    item["LUTDescriptor"].VR = "US"
    item.ModalityLUTType = "US"  # unspecified units
    item.LUTExplanation = "LOG 8000-24383"
    curve = np.log1p(np.linspace(0.0, 50.0, 16384))
    lut = np.rint(curve / curve.max() * 65535).astype(np.uint16)
    item.add_new(0x00283006, "US", [int(v) for v in lut])
    ds.ModalityLUTSequence = [item]
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.WindowCenter, ds.WindowWidth = 40000, 50000
    return ds


def rg1_resampled(rows: int, columns: int, bits_stored: int = 15) -> Callable[[], Dataset]:
    """RG1 at ``rows`` x ``columns`` (nearest neighbour: every value a real one), at ``bits_stored``."""
    def build() -> Dataset:
        ds = rg1()
        arr = ds.pixel_array
        picked = arr[np.linspace(0, arr.shape[0] - 1, rows).round().astype(int)][
            :, np.linspace(0, arr.shape[1] - 1, columns).round().astype(int)].astype(np.int64)
        if bits_stored > 15:
            picked <<= bits_stored - 15
        set_pixels(ds, picked, bits_stored=bits_stored)
        scale = 2 ** (bits_stored - 15)
        ds.WindowCenter, ds.WindowWidth = 15000 * scale, 30000 * scale
        return ds
    return build


def rg1_square(size: int) -> Callable[[], Dataset]:
    """The central square of RG1 reduced to ``size`` x ``size`` by block means."""
    def build() -> Dataset:
        ds = rg1()
        arr = ds.pixel_array
        factor = min(arr.shape) // size
        side = factor * size
        top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
        return set_pixels(ds, block_mean(arr[top:top + side, left:left + side], factor).astype(np.uint16))
    return build


def rg1_cropped() -> Dataset:
    """A wide strip of small RG1 (300 x 460): non-square the other way round from RG1 (taller than wide)."""
    ds = small_rg1()
    return set_pixels(ds, ds.pixel_array[150:450, :])


def claimed_size_rle(rows: int, columns: int) -> Callable[[], Dataset]:
    """A header claiming ``rows`` x ``columns`` 16-bit pixels with a tiny RLE frame (64x64 worth of runs)."""
    def build() -> Dataset:
        ds = rg1_square(64)()
        # an RLE Lossless frame: header (segment count 2, offsets), then for each byte plane one
        # replicate run of 64 x 64 zero bytes, in runs of at most 128 (PS3.5 G.3.1)
        runs = b"".join(bytes([0x81, 0]) for _ in range(64 * 64 // 128))  # -127: repeat next byte 128 times
        header = np.zeros(16, dtype="<u4")
        header[0], header[1], header[2] = 2, 64, 64 + len(runs)
        frame = header.tobytes() + runs + runs
        ds.Rows, ds.Columns = rows, columns
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        return ds
    return build


def dx(intent: str) -> Callable[[], Dataset]:
    """Small RG1 as a DX image ``For Presentation`` or ``For Processing``."""
    def build() -> Dataset:
        ds = small_rg1()
        ds.Modality = "DX"
        ds.SOPClassUID = DX_FOR_PROCESSING if intent == "FOR PROCESSING" else DX_FOR_PRESENTATION
        ds.PresentationIntentType = intent
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.DetectorType = "SCINTILLATOR"
        ds.PresentationLUTShape = "INVERSE"  # DX requires it; INVERSE with MONOCHROME1 (PS3.3 C.8.11.6.1.2)
        return ds
    return build


def secondary_capture() -> Dataset:
    """Small RG1 as a Secondary Capture of a digitised film (a chest the node has no SOP class for)."""
    ds = small_rg1()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.ConversionType = "DF"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    return ds


# -- pydicom-data as it is -------------------------------------------------------------------------------------

@cache
def shipped_radiographs() -> tuple[tuple[str, Path, Dataset], ...]:
    """Every CR and DX file pydicom and pydicom-data ship: (name, path, header)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some of pydicom's own test files are odd on purpose
        headers = [(Path(name), _header(Path(name))) for name in get_testdata_files()]
    for path, header in headers:
        if header is None:
            continue
        if str(header.get("Modality", "")) in ("CR", "DX"):
            label = path.name if path.parent.name in ("data", "test_files") else f"{path.parent.name}-{path.name}"
            found.append((label, path, header))
    return tuple(sorted(found, key=lambda f: f[0]))


def _header(path: Path) -> Dataset | None:
    if not path.is_file():
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not a Part 10 file (dumps, JSON, files without meta): not a radiograph either
        return None


def _shipped_expectation(name: str, header: Dataset) -> tuple[Outcome, str]:
    """What each shipped radiograph must give, from the selection rules (dicom_node/selection.py)."""
    if name.startswith("RG1_"):
        return "analysed", ""  # chest PA
    if name.startswith("RG3_"):
        return "skipped", "not chest"  # a tibia: BodyPartExamined EXTREMITY
    if str(header.get("BodyPartExamined", "")) == "CSPINE":
        return "skipped", "not chest"  # dicomdirtests' 16x16 cervical spine CR (LL and AP)
    raise LookupError(f"{name}: a CR/DX file the corpus has no expectation for")


def _shipped_cases() -> list[Case]:
    cases, seen = [], set()
    for name, path, header in shipped_radiographs():
        outcome, reason = _shipped_expectation(name, header)
        sop = str(header.SOPInstanceUID)
        # RG1_UNCI is RG1_J2KI decompressed, with the same SOP Instance UID (likewise RG3): the node keeps
        # the first copy of a UID, so the second goes to a second node and Orthanc of its own
        site = 1 if sop in seen else 0
        seen.add(sop)
        cases.append(Case(f"shipped-{Path(name).stem}", str(header.file_meta.TransferSyntaxUID), outcome,
                          build=lambda p=path: pydicom.dcmread(p), source_file=path, reason=reason,
                          study=f"shipped-{header.StudyInstanceUID}", site=site,
                          note="as shipped" + (" (its SOP Instance UID is another file's)" if site else "")))
    return cases


# -- the table -----------------------------------------------------------------------------------------------

def _ts(case_id: str, syntax: UID, encode: Callable[[Dataset, Path], None], *, base: Callable[[], Dataset] = rg1,
        lossless: bool, note: str = "") -> Case:
    return Case(case_id, str(syntax), "analysed", build=variant(case_id, base), encode=encode, lossless=lossless,
                note=note)


def _display(case_id: str, base: Callable[[], Dataset], note: str, **changes: object) -> Case:
    return Case(case_id, str(ExplicitVRLittleEndian), "analysed", build=variant(case_id, base, **changes),
                encode=native(ExplicitVRLittleEndian), display=True, note=note)


def _small(case_id: str, expected: Outcome = "analysed", reason: str = "", *, base: Callable[[], Dataset] = small_rg1,
           study: str | None = None, series: str | None = None, status: tuple[int, ...] = (), note: str = "",
           **changes: object) -> Case:
    return Case(case_id, str(ExplicitVRLittleEndian), expected,
                build=variant(case_id, base, study=study, series=series, **changes),
                encode=native(ExplicitVRLittleEndian), reason=reason, status=status, study=study or "",
                note=note)


CASES: list[Case] = [
    *_shipped_cases(),
    # RG1 at full size in every transfer syntax the node accepts (reception/sop.py TRANSFER_SYNTAXES)
    _ts("ts-explicit-le", ExplicitVRLittleEndian, native(ExplicitVRLittleEndian), lossless=True),
    _ts("ts-implicit-le", ImplicitVRLittleEndian, native(ImplicitVRLittleEndian), lossless=True),
    _ts("ts-deflated", DeflatedExplicitVRLittleEndian, native(DeflatedExplicitVRLittleEndian), lossless=True,
        note="DCMTK dcmconv +td; refused C212 before the fix of 28eba28"),
    _ts("ts-big-endian", ExplicitVRBigEndian, native(ExplicitVRBigEndian), lossless=True, note="DCMTK dcmconv +tb"),
    _ts("ts-rle", RLELossless, dcmtk("dcmcrle"), lossless=True, note="DCMTK dcmcrle"),
    _ts("ts-jpeg-baseline", JPEGBaseline8Bit, dcmtk("dcmcjpeg", "+eb"), base=rg1_bits(8, full=True), lossless=False,
        note="RG1 at 8 bits, DCMTK dcmcjpeg +eb"),
    _ts("ts-jpeg-extended", JPEGExtended12Bit, dcmtk("dcmcjpeg", "+ee"), base=rg1_bits(12, full=True), lossless=False,
        note="RG1 at 12 bits, DCMTK dcmcjpeg +ee"),
    _ts("ts-jpeg-lossless", JPEGLossless, dcmtk("dcmcjpeg", "+el"), lossless=True,
        note="DCMTK dcmcjpeg +el (selection value 6)"),
    _ts("ts-jpeg-lossless-sv1", JPEGLosslessSV1, dcmtk("dcmcjpeg", "+e1"), lossless=True, note="DCMTK dcmcjpeg +e1"),
    _ts("ts-jpegls-lossless", JPEGLSLossless, dcmtk("dcmcjpls", "+el"), lossless=True, note="DCMTK dcmcjpls +el"),
    _ts("ts-jpegls-near-lossless", JPEGLSNearLossless, dcmtk("dcmcjpls", "+en"), lossless=False,
        note="DCMTK dcmcjpls +en (NEAR 2)"),
    _ts("ts-j2k-lossless", JPEG2000Lossless, pixel_data_of("RG1_J2KR.dcm"), lossless=True,
        note="RG1_J2KR's codestream"),
    _ts("ts-j2k", JPEG2000, pixel_data_of("RG1_J2KI.dcm"), lossless=False, note="RG1_J2KI's codestream (lossy)"),
    # display transforms (small RG1), each also checked pixel by pixel against pydicom's own LUT functions
    _display("voi-lut-us", rg1_voi_lut("US"), "VOI LUT Sequence (12-bit output), no window, LUT Data US"),
    _display("voi-lut-ow", rg1_voi_lut("OW"), "VOI LUT Sequence (12-bit output), no window, LUT Data OW"),
    _display("window-only", small_rg1, "RG1's own window 15000/30000"),
    _display("windows-several", small_rg1, "two windows, the first narrower (12000/16000)",
             WindowCenter=[12000, 15000], WindowWidth=[16000, 30000], WindowCenterWidthExplanation=["NARROW", "RG1"]),
    _display("no-voi", small_rg1, "no window, no VOI LUT: the data range", WindowCenter=None, WindowWidth=None),
    _display("modality-lut-sequence", rg1_modality_lut, "Modality LUT Sequence (log curve), window in its output"),
    _display("rescale", rg1_rescaled, "Rescale Slope 2, Intercept -1000"),
    _display("monochrome1", small_rg1, "RG1's own MONOCHROME1"),
    _display("monochrome2", rg1_monochrome2, "the same picture as MONOCHROME2"),
    _display("signed", rg1_signed, "Pixel Representation 1"),
    *(_display(f"bits-{bits}", rg1_bits(bits), f"{bits} bits stored") for bits in (8, 10, 12, 14, 16)),
    _display("pixel-padding", rg1_padded, "Pixel Padding Value 32767 on a 24-pixel border"),
    # geometry
    _small("spacing-absent", PixelSpacing=None),
    _small("spacing-zero", PixelSpacing=[0, 0], note="RG1's own 0\\0 (PS3.3 10.7.1.3 wants non-zero values)"),
    _small("imager-spacing-only", PixelSpacing=None, ImagerPixelSpacing=[0.7, 0.7]),
    _small("non-square", base=rg1_cropped, note="300 x 460"),
    Case("large", str(ExplicitVRLittleEndian), "analysed", build=variant("large", rg1_resampled(4280, 3520, 16)),
         encode=native(ExplicitVRLittleEndian), note="4280 x 3520, 16 bits stored"),
    Case("claimed-65535-square", str(RLELossless), "skipped",
         build=variant("claimed-65535-square", claimed_size_rle(65535, 65535)), encode=as_is,
         reason="image too large: 65535 x 65535", note="a 65535 x 65535 header over a tiny RLE frame: stored "
         "(a valid object), skipped from its header before anything is decoded"),
    _small("small", base=rg1_square(64), note="64 x 64"),
    # views and image types
    _small("view-pa", ViewPosition="PA"),
    _small("view-ap", ViewPosition="AP"),
    _small("view-portable-ap", ViewPosition="AP", SeriesDescription="CHEST AP PORTABLE"),
    _small("view-lateral", "skipped", "lateral", ViewPosition="LL"),
    _small("study-pa", study="pa-and-lateral", series="pa", ViewPosition="PA", SeriesNumber=1),
    _small("study-lateral", "skipped", "lateral", study="pa-and-lateral", series="lateral", ViewPosition="LL",
           SeriesNumber=2),
    _small("dx-for-presentation", base=dx("FOR PRESENTATION")),
    _small("dx-for-processing", "skipped", "for processing", base=dx("FOR PROCESSING")),
    _small("derived-secondary", "skipped", "secondary image", ImageType=["DERIVED", "SECONDARY"],
           note="selection skips ImageType value 2 SECONDARY (RG1 itself is DERIVED\\PRIMARY: analysed)"),
    _small("secondary-capture", "refused", "presentation context", base=secondary_capture, status=(NO_CONTEXT,),
           note="SOP class not accepted: the association has no context for it"),
]
