"""A Grayscale Softcopy Presentation State with a rectangle and a label per box.

For viewers that ignore SR coordinates (Weasis, OsiriX and Orthanc Stone draw GSPS). One layer,
PIXEL units, a closed 5-point POLYLINE per box, "AI: <label>" beside it; the image's VOI: its
window, which highdicom copies, or its VOI LUT, given here (highdicom reads LUT Data only as OW
bytes, and many images carry it as US values).
"""

from __future__ import annotations

import numpy as np
from highdicom import VOILUT
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextObject,
)
from pydicom import Dataset

from records.pixels import little_endian, read_lut
from records.schema import ImageResult
from results.authorship import DRAFT_NOTICE, MANUFACTURER, Device
from results.placement import Placement, closed_rectangle, stamp

LAYER = GraphicLayer(layer_name="AI_FINDINGS", order=1, description=DRAFT_NOTICE)


def voi_lut_transformations(image: Dataset) -> list[SoftcopyVOILUTTransformation] | None:
    """The image's first VOI LUT as the state's VOI transformation (at 8 or 16 bits, as a presentation state's
    LUT must be); None when it has none (its window is copied by highdicom)."""
    if not image.get("VOILUTSequence"):
        return None
    item = image.VOILUTSequence[0]
    first, table = read_lut(item, little_endian(image))
    bits = int(item.LUTDescriptor[2])
    if bits in (8, 16):
        data = table.astype(np.uint8 if bits == 8 else np.uint16)
    else:  # a softcopy VOI LUT has 8 or 16 bits (PS3.3 C.11.1.1.1): the same curve over the 16-bit range
        data = np.rint(table * (65535.0 / ((1 << bits) - 1))).astype(np.uint16)
    explanation = str(item.get("LUTExplanation", "") or "") or None
    return [SoftcopyVOILUTTransformation(voi_luts=[VOILUT(first_mapped_value=first, lut_data=data,
                                                          lut_explanation=explanation)])]


def presentation_state(image: Dataset, result: ImageResult, device: Device, place: Placement
                       ) -> GrayscaleSoftcopyPresentationState:
    """The GSPS of one image: a rectangle and "AI: <label>" per box of ``result``, shown in the image's own VOI;
    ValueError when ``image`` and ``result`` are not the same SOP instance."""
    if str(image.SOPInstanceUID) != result.sop_instance_uid:
        raise ValueError("image and result describe different SOP instances")
    graphics, texts = [], []
    for grounding in result.groundings:
        for box in grounding.answer.boxes:
            rectangle = closed_rectangle(box, result.columns, result.rows)
            graphics.append(GraphicObject(graphic_type="POLYLINE", graphic_data=rectangle,
                                          units=AnnotationUnitsValues.PIXEL))
            x1, y1 = rectangle[0]
            x2 = rectangle[2][0]
            top = max(0.0, float(y1) - 40.0)
            texts.append(TextObject(text_value=f"AI: {grounding.label}", units=AnnotationUnitsValues.PIXEL,
                                    bounding_box=(float(x1), top, float(x2), top + 38.0)))
    annotations = [GraphicAnnotation(referenced_images=[image], graphic_layer=LAYER, graphic_objects=graphics,
                                     text_objects=texts)] if graphics else None
    state = GrayscaleSoftcopyPresentationState(
        referenced_images=[image], series_instance_uid=place.series_instance_uid,
        series_number=place.series_number, sop_instance_uid=place.sop_instance_uid,
        instance_number=place.instance_number, manufacturer=MANUFACTURER, manufacturer_model_name=device.model_name,
        software_versions=device.software_version, device_serial_number=device.model_revision[:64],
        content_label="AI_CXR", content_description=DRAFT_NOTICE[:64],
        graphic_annotations=annotations, graphic_layers=[LAYER] if annotations else None,
        voi_lut_transformations=voi_lut_transformations(image),
        institution_name=device.institution_name, content_creator_name="RadVLM^",
        contributing_equipment=[device.contributing_equipment(place.content_datetime)],
        series_description=f"RadVLM boxes - {DRAFT_NOTICE}"[:64],
    )
    if "BodyPartExamined" in image:
        state.BodyPartExamined = image.BodyPartExamined
    stamp(state, place)
    return state
