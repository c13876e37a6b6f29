"""The pixel pipeline: LUTs, windows, MONOCHROME1, 8 bits at the original size, errors as PixelError."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.pixels import PixelError, model_image, read_model_image
from tests.conftest import radiograph


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
    assert "modality LUT" in img.steps
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
