"""The pixel pipeline: LUTs, windows, MONOCHROME1, 8 bits at the original size, errors as PixelError."""

from __future__ import annotations

import io
import tracemalloc
import warnings

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from records.pixels import PixelError, model_image, read_model_image
from testbed.radiographs import radiograph


def _image(values: np.ndarray, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = values.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


RAMP = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))  # 4 x 256, 0..4080


def test_window_maps_to_full_8_bit_range_and_clamps():
    ds = _image(RAMP, WindowCenter=2048, WindowWidth=1024)
    img = model_image(ds)
    assert img.pixels.dtype == np.uint8 and img.pixels.shape == (4, 256)
    row = img.pixels[0]
    assert row[RAMP[0] < 1536].max() == 0 and row[RAMP[0] >= 2560].min() == 255
    assert 120 <= row[RAMP[0] == 2048][0] <= 135
    assert "window center 2048 width 1024 (LINEAR)" in img.steps


def test_monochrome1_is_inverted():
    mono2 = model_image(_image(RAMP, WindowCenter=2048, WindowWidth=4096)).pixels.astype(int)
    mono1 = model_image(_image(RAMP, WindowCenter=2048, WindowWidth=4096,
                               PhotometricInterpretation="MONOCHROME1"))
    assert np.array_equal(mono1.pixels.astype(int), 255 - mono2)
    assert "MONOCHROME1 inverted" in mono1.steps


def test_rescale_is_applied_before_the_window():
    # stored 0..4080 with slope 2, intercept -1000 gives -1000..7160; window 3080/8160 spans it
    ds = _image(RAMP, RescaleSlope=2, RescaleIntercept=-1000, RescaleType="US",
                WindowCenter=3080, WindowWidth=8160)
    img = model_image(ds)
    assert "modality LUT: rescale slope 2 intercept -1000" in img.steps
    assert img.pixels[0, 0] <= 1 and img.pixels[0, -1] >= 254


def test_voi_lut_sequence_is_preferred():
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.LUTData = [4095 - i for i in range(4096)]  # an inverting LUT
    lut.LUTExplanation = "INVERT"
    ds = _image(RAMP, VOILUTSequence=[lut], WindowCenter=2048, WindowWidth=10)
    img = model_image(ds)
    assert img.pixels[0, 0] == 255 and img.pixels[0, -1] <= 1  # 15 of 4095
    assert "VOI LUT INVERT" in img.steps


def test_no_window_uses_the_data_range():
    img = model_image(_image(RAMP + 100))
    assert img.pixels.min() == 0 and img.pixels.max() == 255
    assert "no VOI in header: full data range" in img.steps


def test_real_chest_keeps_size_and_maps_back():
    img = read_model_image(radiograph("RG1_UNCI.dcm"))
    assert (img.rows, img.columns) == (1955, 1841) and img.pixels.shape == (1955, 1841)
    assert img.to_pixels(0.5, 0.25) == (920.5, 488.75)
    # MONOCHROME1: the lungs (low attenuation) must come out dark, the mediastinum bright
    lung = img.pixels[700:900, 350:550].mean()
    mediastinum = img.pixels[700:900, 850:1000].mean()
    assert lung < mediastinum


@pytest.mark.parametrize("mutate, message", [
    (lambda ds: delattr(ds, "PixelData"), "no pixel data"),
    (lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]), "cannot decode pixel data"),
    (lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"), "unsupported PhotometricInterpretation"),
    (lambda ds: setattr(ds, "Rows", 0), "invalid size"),
])
def test_broken_images_raise_pixel_error(mutate, message):
    ds = _image(RAMP, WindowCenter=2048, WindowWidth=1024)
    mutate(ds)
    with pytest.raises(PixelError, match=message):
        model_image(ds)


def test_corrupt_jpeg2000_is_a_pixel_error(tmp_path):
    ds = pydicom.dcmread(radiograph("RG1_J2KR.dcm"))
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([frame[:300]])  # the codestream cut after its header
    path = tmp_path / "corrupt.dcm"
    ds.save_as(path)
    with pytest.raises(PixelError):
        read_model_image(path)
    with pytest.raises(PixelError, match="cannot read"):
        read_model_image(tmp_path / "missing.dcm")


def _rg1_with_voi_lut(ow: bool) -> Dataset:
    """RG1 (15 bits stored, MONOCHROME1) with its window replaced by a VOI LUT Sequence, as vendors' DX carry it:
    a gamma-like curve over 1000..26999 (values outside clamp), LUT Data as US values or as OW bytes (both
    allowed by PS3.3)."""
    ds = pydicom.dcmread(radiograph("RG1_UNCI.dcm"))
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        ds.pop(keyword, None)
    table = np.rint(4095 * (np.arange(26000) / 25999.0) ** 0.6).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [26000, 1000, 12]
    item.LUTExplanation = "GAMMA"
    item.LUTData = table.tobytes() if ow else table.tolist()
    item["LUTData"].VR = "OW" if ow else "US"
    ds.VOILUTSequence = [item]
    return _round_trip(ds)


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_a_voi_lut_is_applied_to_the_stored_integers_as_pydicom_does_whatever_its_vr():
    us, ow = _rg1_with_voi_lut(ow=False), _rg1_with_voi_lut(ow=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Applying a VOI LUT on a float input array" before the fix
        from_us, from_ow = model_image(us), model_image(ow)
    assert "VOI LUT GAMMA" in from_us.steps
    assert np.array_equal(from_us.pixels, from_ow.pixels)
    # pydicom's own VOI LUT on the stored values, min-max over the LUT's range, MONOCHROME1 inverted
    lut_out = apply_voi_lut(us.pixel_array, us, prefer_lut=True).astype(np.float64)
    table = np.asarray(us.VOILUTSequence[0].LUTData, dtype=np.float64)
    reference = np.rint(255 * (1 - (lut_out - table.min()) / (table.max() - table.min())))
    assert np.abs(from_us.pixels.astype(int) - reference).max() <= 1


def test_a_lut_that_cannot_be_read_is_one_bounded_line():
    ds = _rg1_with_voi_lut(ow=True)
    ds.VOILUTSequence[0].LUTData = bytes(range(256)) * 32  # 8 KB for 26,000 entries
    with pytest.raises(PixelError) as raised:
        model_image(ds)
    message = str(raised.value)
    assert "LUT Data holds 8192 bytes for 26000 entries" in message
    assert len(message) <= 300 and "\n" not in message


def test_a_huge_header_is_refused_before_anything_is_decoded():
    """3 KB of RLE claiming 65535 x 65535: refused from the header, without allocating the claimed 8 GiB."""
    ds = _image(RAMP)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows = ds.Columns = 65535
    ds.PixelData = encapsulate([bytes(64) + bytes(3000)])
    tracemalloc.start()
    try:
        with pytest.raises(PixelError, match=r"image too large: 65535 x 65535 .* above the limit of 100"):
            model_image(ds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert model_image(_image(RAMP), max_megapixels=0.002).rows == 4  # 1,024 pixels: within a small limit
    with pytest.raises(PixelError, match="image too large"):
        model_image(_image(RAMP), max_megapixels=0.0005)


def test_pixel_padding_is_black_and_sets_no_range():
    values = RAMP.copy()
    values[:, :16] = 4095  # padding, brighter than any tissue
    img = model_image(_image(values, PixelPaddingValue=4095))
    assert (img.pixels[:, :16] == 0).all()
    assert img.pixels[:, 16:].max() == 255 and img.pixels[:, 16].min() == 0  # the imaged range spans 0..255


def test_only_the_first_frame_of_a_multi_frame_image_is_decoded():
    frames = np.stack([RAMP, RAMP[:, ::-1]])
    ds = _image(RAMP, NumberOfFrames=2)
    ds.PixelData = frames.astype("<u2").tobytes()
    img = model_image(ds)
    assert img.pixels[0, 0] == 0 and img.pixels[0, -1] == 255
    assert "first frame of a multi-frame image" in img.steps
