"""Grayscale Softcopy Presentation State: the findings as non-destructive graphics.

One graphic layer ``AI_FINDINGS`` holds, per finding, a closed POLYLINE around the box
(pixel units, tracking ID/UID shared with the SR) and a text object with its number, label
and score; a second layer ``AI_BANNER`` holds one text line in display units with the
triage result, "NOT FOR DIAGNOSTIC USE" and, for a demo bundle, "DEMO MODEL -
PHANTOM-TRAINED". The VOI (window) is the source's own when it has one; MONOCHROME1
sources get Presentation LUT Shape INVERSE so that bone stays bright. Built only for
single-frame grayscale sources (``supports``).
"""

from __future__ import annotations

import logging
from typing import cast

import highdicom as hd
from highdicom._standard_utils import is_multiframe_image
from pydicom.dataset import Dataset

from spine_node.results import codes
from spine_node.results.equipment import algorithm_equipment, software_versions
from spine_node.results.options import ResultOptions
from spine_node.results.sr import box_polyline
from spine_node.results.types import CascadeResult, ModelInfo, Status, display_label
from spine_node.results.uids import (
    ResultKind,
    bundle_key,
    series_instance_uid,
    sop_instance_uid,
    tracking_uid,
)

logger = logging.getLogger(__name__)

FINDINGS_LAYER = "AI_FINDINGS"
BANNER_LAYER = "AI_BANNER"
CONTENT_LABEL = "SPINE_AI"


def supports(reference: Dataset) -> bool:
    """Return True when a GSPS can annotate ``reference`` (single-frame grayscale)."""
    try:
        return (
            int(reference.get("SamplesPerPixel") or 1) == 1
            and str(reference.get("PhotometricInterpretation", "")).strip()
            in {"MONOCHROME1", "MONOCHROME2"}
            and int(reference.get("Rows") or 0) > 0
            and int(reference.get("Columns") or 0) > 0
            and not is_multiframe_image(reference)
        )
    except (TypeError, ValueError):
        return False


def banner_text(result: CascadeResult, model: ModelInfo) -> str:
    """Return the one-line banner of the presentation state."""
    if result.status is Status.NOT_PROCESSED:
        verdict = f"NOT PROCESSED - {result.reason}"
    else:
        verdict = "ABNORMAL" if result.status is Status.POSITIVE else "NORMAL"
        verdict += f" p={result.score:.3f}"
    parts = [f"AI TRIAGE: {verdict}", f"{model.name} {model.version}", codes.NOT_FOR_DIAGNOSTIC_USE]
    if model.demo:
        parts.append(codes.DEMO_TEXT)
    return " | ".join(parts)[:1024]


def build_gsps(
    reference: Dataset,
    result: CascadeResult,
    model: ModelInfo,
    options: ResultOptions,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """Build the GSPS for one image with findings.

    Parameters
    ----------
    reference : pydicom.Dataset
        Clean source reference from ``builder.reference_dataset``; ``supports`` must be True.
    result : CascadeResult
        Must have at least one finding.
    model : ModelInfo
        The bundle that produced it.
    options : ResultOptions
        Series number, description, manufacturer, institution.

    Returns
    -------
    highdicom.pr.GrayscaleSoftcopyPresentationState
        The presentation state, in the source study, in the GSPS result series.
    """
    if not result.findings:
        raise ValueError("a GSPS needs at least one finding, got none")
    if not supports(reference):
        raise ValueError(
            "a GSPS needs a single-frame grayscale source, got "
            f"{reference.get('PhotometricInterpretation')!r} "
            f"with SamplesPerPixel {reference.get('SamplesPerPixel')!r}"
        )
    bundle = bundle_key(model)
    source_uid = str(reference.SOPInstanceUID)
    rows, columns = int(reference.Rows), int(reference.Columns)
    findings_layer = hd.pr.GraphicLayer(
        layer_name=FINDINGS_LAYER, order=1, description="spine-node AI findings"
    )
    banner_layer = hd.pr.GraphicLayer(
        layer_name=BANNER_LAYER, order=2, description="spine-node AI triage result"
    )
    graphics = []
    texts = []
    text_height = max(8.0, rows * 0.03)
    for index, finding in enumerate(result.findings, start=1):
        key = f"finding-{index}"
        label = display_label(finding.label)
        graphics.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=box_polyline(finding.box, reference),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=f"Finding {index}: {label}",
                tracking_uid=tracking_uid(source_uid, bundle, key),
            )
        )
        xmin, ymin, xmax, _ = (float(v) for v in finding.box)
        left = min(max(xmin, 0.0), columns - 1.0)
        right = min(max(xmax, left + 1.0), float(columns))
        top = ymin - text_height if ymin - text_height >= 0 else max(ymin, 0.0)
        top = min(top, rows - text_height) if rows > text_height else 0.0
        bottom = min(top + text_height, float(rows))
        text = f"{index}. {label} {finding.score:.2f}"
        if finding.grade:
            text += f" grade {finding.grade}"
        texts.append(
            hd.pr.TextObject(
                text_value=text,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=(left, top, right, bottom),
            )
        )
    annotations = [
        hd.pr.GraphicAnnotation(
            referenced_images=[reference],
            graphic_layer=findings_layer,
            graphic_objects=graphics,
            text_objects=texts,
        ),
        hd.pr.GraphicAnnotation(
            referenced_images=[reference],
            graphic_layer=banner_layer,
            text_objects=[
                hd.pr.TextObject(
                    text_value=banner_text(result, model),
                    units=hd.pr.AnnotationUnitsValues.DISPLAY,
                    bounding_box=(0.01, 0.01, 0.99, 0.06),
                    text_justification=hd.pr.TextJustificationValues.LEFT,
                )
            ],
        ),
    ]
    inverse = str(reference.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    presentation_lut = hd.PresentationLUTTransformation(
        presentation_lut_shape=(
            hd.PresentationLUTShapeValues.INVERSE
            if inverse
            else hd.PresentationLUTShapeValues.IDENTITY
        )
    )
    description = "AI spine findings" + (f" - {codes.DEMO_TEXT}" if model.demo else "")
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[reference],
        series_instance_uid=series_instance_uid(
            str(reference.StudyInstanceUID), ResultKind.GSPS, bundle
        ),
        series_number=options.gsps_series_number,
        sop_instance_uid=sop_instance_uid(source_uid, ResultKind.GSPS, bundle),
        instance_number=1,
        manufacturer=options.manufacturer,
        manufacturer_model_name=model.name[:64],
        software_versions=cast(tuple[str], tuple(software_versions(model))),
        device_serial_number=cast(str, None),
        content_label=CONTENT_LABEL,
        content_description=description[:64],
        graphic_annotations=annotations,
        graphic_layers=[findings_layer, banner_layer],
        institution_name=options.institution_name or None,
        institutional_department_name=options.institutional_department_name or None,
        presentation_lut_transformation=presentation_lut,
        series_description=options.series_description("gsps", model),
        specific_character_set=reference.SpecificCharacterSet,
        contributing_equipment=[algorithm_equipment(model, options)],
    )
    gsps.Laterality = reference.get("Laterality") or ""  # type 2C in General Series
    logger.debug("built GSPS %s for %s", gsps.SOPInstanceUID, source_uid)
    return gsps
