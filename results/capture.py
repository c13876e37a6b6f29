"""A Secondary Capture with the boxes burned in, for viewers that draw neither SR nor GSPS.

Off by default (it duplicates pixels in the PACS). A new series, BurnedInAnnotation YES, derived
from the model image (the windowed 8-bit view); the original image is never replaced.
"""

from __future__ import annotations

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw
from pydicom import Dataset

from records.pixels import ModelImage
from records.schema import ImageResult
from results.authorship import DRAFT_NOTICE, MANUFACTURER, Device
from results.placement import Placement, closed_rectangle, stamp

BOX_COLOUR = (255, 64, 64)


def draw_boxes(model_image: ModelImage, result: ImageResult | None) -> Image.Image:
    """The model image in RGB with each box of ``result`` drawn and labelled (none if ``result`` is None)."""
    canvas = Image.fromarray(model_image.pixels, mode="L").convert("RGB")
    if result is None:
        return canvas
    draw = ImageDraw.Draw(canvas)
    width = max(2, result.columns // 400)
    for grounding in result.groundings:
        for box in grounding.answer.boxes:
            points = [tuple(map(float, p)) for p in closed_rectangle(box, result.columns, result.rows)]
            draw.line(points, fill=BOX_COLOUR, width=width)
            draw.text((points[0][0] + width, max(0.0, points[0][1] - 12 * width)), f"AI: {grounding.label}",
                      fill=BOX_COLOUR, font_size=10 * width)
    return canvas


def burned_in_capture(image: Dataset, model_image: ModelImage, result: ImageResult, device: Device,
                      place: Placement) -> SCImage:
    """The Secondary Capture of one image with ``result``'s boxes burned in, in a series of its own marked as a draft;
    ValueError when ``image`` and ``result`` are not the same SOP instance."""
    if str(image.SOPInstanceUID) != result.sop_instance_uid:
        raise ValueError("image and result describe different SOP instances")
    canvas = draw_boxes(model_image, result)
    capture = SCImage.from_ref_dataset(
        ref_dataset=image, pixel_array=np.asarray(canvas), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=place.series_instance_uid,
        series_number=place.series_number, sop_instance_uid=place.sop_instance_uid,
        instance_number=place.instance_number, manufacturer=MANUFACTURER,
        patient_orientation=tuple(image.PatientOrientation) if len(image.get("PatientOrientation", [])) == 2
        else ("", ""),
        contributing_equipment=[device.contributing_equipment(place.content_datetime)],
        series_description=f"RadVLM boxes burned in - {DRAFT_NOTICE}"[:64],
        manufacturer_model_name=device.model_name, software_versions=device.software_version,
    )
    if "BodyPartExamined" in image:  # decides dciodvfy's General Series Laterality condition
        capture.BodyPartExamined = image.BodyPartExamined
    capture.BurnedInAnnotation = "YES"
    capture.ImageComments = DRAFT_NOTICE
    stamp(capture, place)
    return capture
