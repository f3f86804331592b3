"""Optional Grayscale Softcopy Presentation State: the segment outlines and the summary figures as
graphics over the source image, for PACS viewers that display presentation states but not SEG or SR.
Nothing of the source's pixels is copied; each segment is a graphic layer in its SEG colour."""
from __future__ import annotations

import re
from datetime import datetime

import highdicom as hd
import pydicom

from dicom_node.history import Change
from dicom_node.kinds import Kind
from dicom_node.outputs import summary
from dicom_node.outputs.capture import NOTICE
from dicom_node.outputs.identity import Algorithm, finish_header, lo, result_identity
from dicom_node.outputs.outlines import outlines
from dicom_node.outputs.segments import SEGMENTS
from model.infer import Segmentation


def build_presentation_state(source: pydicom.Dataset, seg: Segmentation, algorithm: Algorithm,
                             started: datetime, change: Change | None = None) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """`source` as `prepare_source` gives it (its header; the pixels are not needed)."""
    annotations, layers = [], []
    for order, segment in enumerate(SEGMENTS, start=1):
        name = re.sub(r"[^A-Z0-9]+", "_", segment.label.upper()).strip("_")[:16]  # a CS value: RIGHT_LUNG
        layer = hd.pr.GraphicLayer(layer_name=name, order=order, description=lo(segment.label),
                                   display_color=hd.color.CIELabColor.from_rgb(*segment.rgb))
        shapes = [hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=shape,
                                      units=hd.pr.AnnotationUnitsValues.PIXEL) for shape in outlines(segment.mask(seg))]
        if shapes:
            layers.append(layer)
            annotations.append(hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                                       graphic_objects=shapes))
    text_layer = hd.pr.GraphicLayer(layer_name="FIGURES", order=len(SEGMENTS) + 1, description="AI figures")
    lines = [summary.sentence(seg)] + ([change.sentence()] if change else []) + [NOTICE]
    texts = [hd.pr.TextObject(text_value=text, units=hd.pr.AnnotationUnitsValues.DISPLAY,
                              bounding_box=(0.02, 0.02 + 0.05 * index, 0.98, 0.06 + 0.05 * index),
                              text_justification=hd.pr.TextJustificationValues.LEFT)
             for index, text in enumerate(lines)]
    layers.append(text_layer)
    annotations.append(hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=text_layer, text_objects=texts))
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source], **result_identity(source, Kind.PR, algorithm), manufacturer_model_name=lo(algorithm.name),
        software_versions=algorithm.software_versions, device_serial_number="0", content_label="AI_OPACITY",
        content_description=lo(f"{NOTICE}: outlines and figures"), graphic_annotations=annotations,
        graphic_layers=layers, contributing_equipment=[algorithm.contributing_equipment(started)])
    finish_header(state, source, Kind.PR, started)
    # A presentation state has its creation date and time in place of content date and time.
    state.PresentationCreationDate, state.PresentationCreationTime = state.ContentDate, state.ContentTime
    del state.ContentDate, state.ContentTime
    state.BodyPartExamined = source.get("BodyPartExamined") or "CHEST"  # as the SC: no laterality needed
    if "Laterality" in state:
        del state.Laterality
    return state
