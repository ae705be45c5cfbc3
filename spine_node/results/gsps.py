"""Grayscale Softcopy Presentation State: the findings as non-destructive graphics.

One graphic layer ``AI_FINDINGS`` holds, per finding, a closed POLYLINE around the box
(pixel units, tracking ID/UID shared with the SR) and a text object with its number, label
and score; a second layer ``AI_BANNER`` holds one text line in display units with the
triage result, "NOT FOR DIAGNOSTIC USE" and, for a demo bundle, "DEMO MODEL -
PHANTOM-TRAINED". The VOI (window) is the source's own when it has one; MONOCHROME1
sources get Presentation LUT Shape INVERSE so that bone stays bright. Built only for
single-frame grayscale sources (``supports``).

The presentation (modality and VOI transformations) is never copied blindly from the source:
``safe_presentation`` rebuilds it from values it can check (highdicom's automatic copy
refuses sources that carry both a window and a VOI LUT, and passes on LUT data in another VR
or decimal strings with commas). The VOI LUT Sequence is preferred (as ``imaging`` does), its
first item rebuilt from the descriptor and the data in whatever VR and packing it arrived;
then the first window pair (a decimal comma read as a point; width > 0); otherwise no VOI
(the viewer's default). A source whose presentation cannot be reproduced (a Modality LUT
Sequence) gets no GSPS: :class:`GSPSUnavailable` names the reason, and the builder logs it
and still sends the SR and the overlay.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, cast

import highdicom as hd
import numpy as np
from highdicom._standard_utils import is_multiframe_image
from pydicom.dataset import Dataset

from spine_node.results import codes, layout
from spine_node.results.equipment import algorithm_equipment, software_versions
from spine_node.results.options import ResultOptions
from spine_node.results.sr import box_polyline
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status, display_label
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


class GSPSUnavailable(ValueError):
    """A GSPS cannot faithfully present this source; the message says why."""


@dataclass(frozen=True)
class Presentation:
    """The transformations a GSPS applies to its source.

    Attributes
    ----------
    modality : highdicom.ModalityLUTTransformation or None
        Rescale slope/intercept (None: identity).
    voi : highdicom.pr.SoftcopyVOILUTTransformation or None
        Window or VOI LUT (None: the viewer's default).
    notes : tuple of str
        What was repaired or left out, for the log.
    """

    modality: hd.ModalityLUTTransformation | None
    voi: hd.pr.SoftcopyVOILUTTransformation | None
    notes: tuple[str, ...] = ()


def safe_presentation(reference: Dataset) -> Presentation:
    """Return modality and VOI transformations for a GSPS of ``reference`` that are valid.

    Parameters
    ----------
    reference : pydicom.Dataset
        Clean source reference (``builder.reference_dataset``), VOI attributes as received.

    Returns
    -------
    Presentation

    Raises
    ------
    GSPSUnavailable
        When the source's presentation cannot be reproduced (Modality LUT Sequence).
    """
    if "ModalityLUTSequence" in reference:
        raise GSPSUnavailable(
            "the source has a Modality LUT Sequence, which the presentation state would "
            "have to reproduce"
        )
    notes: list[str] = []
    modality = None
    slope = _first_decimal(reference, "RescaleSlope", notes)
    intercept = _first_decimal(reference, "RescaleIntercept", notes)
    if slope is not None and slope != 0 and intercept is not None:
        if (slope, intercept) != (1.0, 0.0):
            modality = hd.ModalityLUTTransformation(
                rescale_intercept=intercept,
                rescale_slope=slope,
                rescale_type=hd.RescaleTypeValues.US,
            )
    elif slope is not None or intercept is not None:
        notes.append(f"rescale slope {slope!r} / intercept {intercept!r} unusable: identity")
    voi = None
    if "VOILUTSequence" in reference:
        try:
            voi = hd.pr.SoftcopyVOILUTTransformation(voi_luts=[_voi_lut(reference)])
        except (TypeError, ValueError, AttributeError, IndexError) as exc:
            notes.append(f"VOI LUT unusable ({exc}); trying the window")
    if voi is None:
        voi = _window(reference, notes)
    return Presentation(modality, voi, tuple(notes))


def _decimals(value: Any) -> list[float]:
    """Decimal string(s) as floats; a decimal comma is read as a point."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        items: list[Any] = value.split("\\")
    elif isinstance(value, (int, float)):
        items = [value]
    else:
        items = list(value)
    out = []
    for item in items:
        if isinstance(item, (int, float)):
            out.append(float(item))
            continue
        text = str(item).strip()
        if re.fullmatch(r"[+-]?\d+,\d*", text):
            text = text.replace(",", ".")
        out.append(float(text))
    if not all(np.isfinite(out)):
        raise ValueError(f"not finite: {value!r}")
    return out


def _first_decimal(reference: Dataset, keyword: str, notes: list[str]) -> float | None:
    try:
        element = reference.get_item(keyword)
        values = _decimals(None if element is None else element.value)
    except (TypeError, ValueError) as exc:
        notes.append(f"{keyword} unreadable ({exc})")
        return None
    return values[0] if values else None


def _window(reference: Dataset, notes: list[str]) -> hd.pr.SoftcopyVOILUTTransformation | None:
    centre = _first_decimal(reference, "WindowCenter", notes)
    width = _first_decimal(reference, "WindowWidth", notes)
    if centre is None or width is None:
        return None
    function = str(reference.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        notes.append(f"VOI LUT Function {function!r} unknown: LINEAR")
        function = "LINEAR"
    if not (width >= 1.0 if function == "LINEAR" else width > 0.0):  # PS3.3 C.11.2.1.2
        notes.append(f"window width {width!r} unusable: no VOI")
        return None
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=centre, window_width=width, voi_lut_function=function
    )


def _voi_lut(reference: Dataset) -> hd.VOILUT:
    """Rebuild the first VOI LUT item from its descriptor and data, whatever their VR."""
    item = reference.VOILUTSequence[0]
    descriptor = item.LUTDescriptor
    if isinstance(descriptor, bytes):
        descriptor = np.frombuffer(descriptor, "<u2").tolist()
    entries, first, bits = (int(v) for v in list(descriptor)[:3])
    entries = entries or 65536
    if not 8 <= bits <= 16:
        raise ValueError(f"LUT descriptor bits {bits} not in 8..16")
    data = item.LUTData
    words = (
        np.frombuffer(bytes(data)[: len(data) // 2 * 2], "<u2")
        if isinstance(data, bytes)
        else np.asarray(list(data) if not isinstance(data, int) else [data], dtype=np.int64)
    )
    if len(words) >= entries:
        values = np.asarray(words[:entries], dtype=np.int64)
    elif bits <= 8 and 2 * len(words) >= entries:  # 8-bit entries packed two per word
        values = np.asarray(words, dtype="<u2").view(np.uint8)[:entries].astype(np.int64)
    else:
        raise ValueError(f"LUT data has {len(words)} words for {entries} entries")
    if values.min() < 0 or values.max() >= 2**bits:
        raise ValueError(f"LUT data outside {bits} bits")
    signed = int(reference.get("PixelRepresentation") or 0) == 1
    if signed and first >= 32768:
        first -= 65536
    explanation = item.get("LUTExplanation")
    # A GSPS VOI LUT has 8-bit entries (packed two per word) or 16-bit ones (PS3.3
    # C.11.2.1.1, as dciodvfy enforces). The output range is that of the bits the data
    # really use (as DCMTK reads a LUT whose descriptor overstates them); data of 9 to 15
    # bits are rescaled to 16 bits, which keeps every output as the same fraction of white.
    used = max(8, int(values.max()).bit_length())
    if used == 8:
        table = values.astype(np.uint8)
    else:
        table = np.rint(values * (65535.0 / (2**used - 1))).astype(np.uint16)
    return hd.VOILUT(
        first_mapped_value=first,
        lut_data=table,
        lut_explanation=str(explanation)[:64] if explanation else None,
    )


#: Source attributes that highdicom would copy into the GSPS on its own.
_PRESENTATION_ATTRIBUTES = (
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
)


def _without_presentation(reference: Dataset) -> Dataset:
    """A shallow copy without modality/VOI attributes: ours are passed explicitly."""
    copy = Dataset(reference)
    for keyword in _PRESENTATION_ATTRIBUTES:
        if keyword in copy:
            del copy[keyword]
    return copy


def _label_text(index: int, finding: Finding) -> str:
    text = f"{index}. {display_label(finding.label)} {finding.score:.2f}"
    if finding.grade:
        text += f" grade {finding.grade}"
    return text


def _label_boxes(
    result: CascadeResult, texts: list[str], height: float, rows: int, columns: int
) -> list[tuple[float, float, float, float]]:
    """Text bounding boxes (pixel units) that cover no other label and no other finding's box.

    Placed by ``layout.place_labels`` with a width estimated from the text (0.6 x height per
    character); a label that finds no free place inside the image (a GSPS text must stay on
    the image) goes just above its box, as before.
    """
    boxes = [
        layout.Rect(
            int(max(0.0, f.box[0])),
            int(max(0.0, f.box[1])),
            int(min(columns, np.ceil(f.box[2])) + 1),
            int(min(rows, np.ceil(f.box[3])) + 1),
        )
        for f in result.findings
    ]
    h = max(1, int(np.ceil(height)))
    sizes = [(max(1, min(columns, int(np.ceil(len(t) * 0.6 * height)))), h) for t in texts]
    placed = layout.place_labels(boxes, sizes, columns, rows, edge=1)
    out = []
    for finding, rect in zip(result.findings, placed.labels, strict=True):
        if rect.x1 <= columns and rect.y1 <= rows:
            out.append((float(rect.x0), float(rect.y0), float(rect.x1), float(rect.y1)))
            continue
        xmin, ymin, xmax, _ = (float(v) for v in finding.box)
        left = min(max(xmin, 0.0), columns - 1.0)
        right = min(max(xmax, left + 1.0), float(columns))
        top = ymin - height if ymin - height >= 0 else max(ymin, 0.0)
        top = min(top, rows - height) if rows > height else 0.0
        out.append((left, top, right, min(top + height, float(rows))))
    return out


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
    presentation = safe_presentation(reference)
    for note in presentation.notes:
        logger.info("GSPS for %s: %s", reference.SOPInstanceUID, note)
    reference = _without_presentation(reference)
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
    label_texts = [_label_text(i, f) for i, f in enumerate(result.findings, start=1)]
    label_boxes = _label_boxes(result, label_texts, text_height, rows, columns)
    for index, (finding, text, bounding_box) in enumerate(
        zip(result.findings, label_texts, label_boxes, strict=True), start=1
    ):
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
        texts.append(
            hd.pr.TextObject(
                text_value=text,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=bounding_box,
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
        software_versions=cast(tuple[str], software_versions(model)),  # a list: pydicom warns on tuples
        device_serial_number=cast(str, None),
        content_label=CONTENT_LABEL,
        content_description=description[:64],
        graphic_annotations=annotations,
        graphic_layers=[findings_layer, banner_layer],
        institution_name=options.institution_name or None,
        institutional_department_name=options.institutional_department_name or None,
        presentation_lut_transformation=presentation_lut,
        modality_lut_transformation=presentation.modality,
        voi_lut_transformations=None if presentation.voi is None else [presentation.voi],
        series_description=options.series_description("gsps", model),
        specific_character_set=reference.SpecificCharacterSet,
        contributing_equipment=[algorithm_equipment(model, options)],
    )
    gsps.Laterality = reference.get("Laterality") or ""  # type 2C in General Series
    logger.debug("built GSPS %s for %s", gsps.SOPInstanceUID, source_uid)
    return gsps
