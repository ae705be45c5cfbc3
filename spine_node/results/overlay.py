"""Secondary Capture overlay: the source image with the boxes and a banner burned in.

Choice: 8-bit MONOCHROME2. A grayscale SC is a third of the size of an RGB one (spine
radiographs run to 3000 x 3000 pixels) and every viewer shows it the same way. Boxes are
drawn white with a black rim so they stand out on bright bone and dark background alike;
each box carries its number, label and score on a black tab, placed by ``layout`` so that no
tab covers another tab or another finding's box (a tab away from its box gets a leader line;
when findings leave no free place, tabs go to a column added right of the image).

The display image is ``imaging.decode(source).pixels`` (modality LUT, VOI LUT / window,
MONOCHROME1 inverted: bone is bright). Images narrower than ``MIN_WIDTH`` are enlarged by an
integer factor (nearest neighbour) so that the text stays legible. The banner is added
*above* the image (nothing of the image is hidden); it states the triage result, the
findings, the model name and version, "NOT FOR DIAGNOSTIC USE" and,
for a demo bundle, "DEMO MODEL - PHANTOM-TRAINED".
"""

from __future__ import annotations

import logging
import math

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from spine_node import imaging
from spine_node.imaging import to_uint8
from spine_node.results import codes, layout
from spine_node.results.equipment import algorithm_equipment, software_versions
from spine_node.results.options import ResultOptions
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status, display_label
from spine_node.results.uids import ResultKind, bundle_key, series_instance_uid, sop_instance_uid

logger = logging.getLogger(__name__)

#: Images narrower than this are enlarged (integer factor) before drawing.
MIN_WIDTH = 768
_MAX_UPSCALE = 16
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = 255
_BLACK = 0


def banner_lines(result: CascadeResult, model: ModelInfo) -> list[str]:
    """Return the banner text, one line per item (ASCII).

    Parameters
    ----------
    result : CascadeResult
        The cascade's answer.
    model : ModelInfo
        The bundle that produced it.

    Returns
    -------
    list of str
        Triage line, findings line (positive only), model, warnings. Nothing about the
        study as a whole: a later image could make it false.
    """
    if result.status is Status.NOT_PROCESSED:
        lines = [f"AI TRIAGE: NOT PROCESSED - {result.reason}"]
    else:
        verdict = "ABNORMAL" if result.status is Status.POSITIVE else "NORMAL"
        lines = [f"AI TRIAGE: {verdict}  p={result.score:.3f} (threshold {result.threshold:.3f})"]
    if result.status is Status.POSITIVE:
        if result.findings:
            found = ", ".join(
                f"{i}. {display_label(f.label)} {f.score:.2f}"
                for i, f in enumerate(result.findings, start=1)
            )
            lines.append(f"Findings: {found}")
        else:
            lines.append("Findings: none localised")
    lines.append(f"Model: {model.name} {model.version}")
    lines.append(codes.NOT_FOR_DIAGNOSTIC_USE)
    if model.demo:
        lines.append(codes.DEMO_TEXT)
    return [_ascii(line) for line in lines]


def render_overlay(
    pixels: np.ndarray,
    result: CascadeResult,
    model: ModelInfo,
) -> np.ndarray:
    """Draw boxes and banner on a display image.

    Parameters
    ----------
    pixels : numpy.ndarray
        float in [0, 1] or uint8 (``imaging.to_uint8``), shape (rows, columns), display polarity.
    result, model
        What to draw.

    Returns
    -------
    numpy.ndarray
        uint8 (banner_rows + k * rows, k * columns + side), ``k`` the enlargement factor,
        ``side`` the label column added when findings leave no free place for a label
        (``layout.place_labels``; 0 otherwise).
    """
    array = np.asarray(pixels)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"pixels must be a non-empty 2-D array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype == np.uint8):
        raise TypeError(f"pixels must be floating point in [0, 1] or uint8, got {array.dtype}")
    image = to_uint8(array)
    scale = upscale_factor(image.shape[1])
    if scale > 1:
        image = cv2.resize(
            image,
            (image.shape[1] * scale, image.shape[0] * scale),
            interpolation=cv2.INTER_NEAREST,
        )
    image = np.ascontiguousarray(image)
    width = image.shape[1]
    font_scale = max(0.35, width / 1400.0)
    thickness = max(1, round(width / 700))
    box_thickness = max(2, round(width / 400))

    labels = [_label_text(i, f) for i, f in enumerate(result.findings, start=1)]
    rim = (box_thickness + 2) // 2 + 1  # the drawn outline reaches this far outside the box
    boxes = [layout.Rect(*_box_pixels(f.box, scale, image.shape, rim)) for f in result.findings]
    placement = layout.place_labels(
        boxes,
        [_label_size(t, font_scale, thickness) for t in labels],
        width,
        image.shape[0],
        edge=2 * rim + 1,
    )
    if placement.side_width:
        image = np.hstack(
            [image, np.full((image.shape[0], placement.side_width), _BLACK, dtype=np.uint8)]
        )
        width = image.shape[1]
    for finding in result.findings:
        x0, y0, x1, y1 = (round(v * scale) for v in finding.box)
        cv2.rectangle(image, (x0, y0), (x1, y1), _BLACK, box_thickness + 2, cv2.LINE_AA)
        cv2.rectangle(image, (x0, y0), (x1, y1), _WHITE, box_thickness, cv2.LINE_AA)
    for box, rect in zip(boxes, placement.labels, strict=True):
        near = layout.Rect(rect.x0 - 1, rect.y0 - 1, rect.x1 + 1, rect.y1 + 1)
        if not near.intersects(box):  # away from its box: a leader line shows which it names
            _leader(image, rect, box, thickness)
    for text, rect in zip(labels, placement.labels, strict=True):
        _draw_label(image, text, rect, font_scale, thickness)

    banner = _banner(banner_lines(result, model), width, font_scale, thickness)
    return np.vstack([banner, image])


def upscale_factor(columns: int) -> int:
    """Return the integer enlargement applied to an image ``columns`` wide."""
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns!r}")
    return int(min(_MAX_UPSCALE, max(1, math.ceil(MIN_WIDTH / columns))))


def build_overlay(
    reference: Dataset,
    image: imaging.SourceImage,
    result: CascadeResult,
    model: ModelInfo,
    options: ResultOptions,
) -> hd.sc.SCImage:
    """Build the Secondary Capture overlay for one image.

    Parameters
    ----------
    reference : pydicom.Dataset
        Clean source reference from ``builder.reference_dataset``.
    image : imaging.SourceImage
        Decoded display image of the source.
    result, model : CascadeResult, ModelInfo
        What to draw.
    options : ResultOptions
        Series number, description, manufacturer, institution.

    Returns
    -------
    highdicom.sc.SCImage
        8-bit MONOCHROME2, BurnedInAnnotation YES, ImageType DERIVED\\SECONDARY, referencing
        the source through SourceImageSequence and ReferencedImageSequence.
    """
    canvas = render_overlay(image.pixels, result, model)
    scale = upscale_factor(image.columns)
    return secondary_capture(
        reference,
        image,
        canvas,
        model,
        options,
        kind=ResultKind.SC,
        series_number=options.sc_series_number,
        series_description=options.series_description("sc", model),
        derivation=(
            "AI result overlay burned into the source image"
            + (f" (enlarged x{scale})" if scale > 1 else "")
            + f"; banner of {canvas.shape[0] - image.rows * scale} rows added above"
        ),
    )


def secondary_capture(
    reference: Dataset,
    image: imaging.SourceImage,
    canvas: np.ndarray,
    model: ModelInfo,
    options: ResultOptions,
    *,
    kind: ResultKind,
    series_number: int,
    series_description: str,
    derivation: str,
) -> hd.sc.SCImage:
    """A Secondary Capture of a rendered ``canvas`` derived from the source image.

    Shared by the overlay and the heatmap (``results.heatmap``): the source's patient and
    study, a series per ``kind`` and bundle and a SOP Instance UID per source, ``kind`` and
    bundle (``results.uids``), ImageType DERIVED\\SECONDARY, BurnedInAnnotation YES,
    ConversionType WSD, the source referenced in SourceImageSequence (with its purpose) and
    ReferencedImageSequence.

    Parameters
    ----------
    reference : pydicom.Dataset
        Clean source reference.
    image : imaging.SourceImage
        Decoded display image of the source (its frame is referenced).
    canvas : numpy.ndarray
        uint8 ``(rows, columns)`` (MONOCHROME2) or ``(rows, columns, 3)`` (RGB).
    model, options : ModelInfo, ResultOptions
        Bundle and series settings.
    kind : ResultKind
        Object kind (part of the UIDs).
    series_number : int
        Series Number.
    series_description : str
        Series Description.
    derivation : str
        Derivation Description.

    Returns
    -------
    highdicom.sc.SCImage
    """
    bundle = bundle_key(model)
    source_uid = str(reference.SOPInstanceUID)
    sc = hd.sc.SCImage(
        pixel_array=canvas,
        photometric_interpretation="RGB" if canvas.ndim == 3 else "MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(reference.StudyInstanceUID),
        series_instance_uid=series_instance_uid(str(reference.StudyInstanceUID), kind, bundle),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid(source_uid, kind, bundle),
        instance_number=1,
        manufacturer=options.manufacturer,
        patient_id=reference.get("PatientID"),
        patient_name=reference.get("PatientName"),
        patient_birth_date=reference.get("PatientBirthDate") or None,
        patient_sex=reference.get("PatientSex") or None,
        accession_number=reference.get("AccessionNumber"),
        study_id=reference.get("StudyID"),
        study_date=reference.get("StudyDate") or None,
        study_time=reference.get("StudyTime") or None,
        referring_physician_name=reference.get("ReferringPhysicianName"),
        # Placeholder required by highdicom for PATIENT; replaced below by the source's value.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description,
        manufacturer_model_name=model.name[:64],
        software_versions=software_versions(model),
        institution_name=options.institution_name or None,
        institutional_department_name=options.institutional_department_name or None,
        specific_character_set=reference.SpecificCharacterSet,
        contributing_equipment=[algorithm_equipment(model, options)],
    )
    sc.copy_patient_and_study_information(reference)
    sc.PatientOrientation = reference.get("PatientOrientation", [])  # type 2C: empty if unknown
    sc.Laterality = reference.get("Laterality") or ""  # type 2C in General Series
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    lossy = str(reference.get("LossyImageCompression") or "") == "01"
    sc.LossyImageCompression = "01" if lossy else "00"
    sc.DerivationDescription = derivation
    comments = [codes.NOT_FOR_DIAGNOSTIC_USE]
    if model.demo:
        comments.append(codes.DEMO_TEXT)
    sc.ImageComments = "; ".join(comments)

    source_item = _image_reference(reference, image)
    purpose = hd.sr.CodedConcept.from_code(codes.SOURCE_IMAGE_PURPOSE)
    source_item.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [source_item]
    sc.ReferencedImageSequence = [_image_reference(reference, image)]
    logger.debug("built %s %s for %s", kind.value, sc.SOPInstanceUID, source_uid)
    return sc


def _image_reference(reference: Dataset, image: imaging.SourceImage) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.SOPClassUID
    item.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    try:
        n_frames = int(reference.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames > 1:
        item.ReferencedFrameNumber = image.frame + 1
    return item


def _label_text(index: int, finding: Finding) -> str:
    text = f"{index}. {display_label(finding.label)} {finding.score:.2f}"
    if finding.grade:
        text += f" grade {finding.grade}"
    return _ascii(text)


def _label_size(text: str, font_scale: float, thickness: int) -> tuple[int, int]:
    """Width and height of a label tab (text plus padding) in pixels."""
    (tw, th), baseline = cv2.getTextSize(text, _FONT, font_scale, thickness)
    pad = max(2, th // 4)
    return tw + 2 * pad, th + baseline + 2 * pad


def _box_pixels(
    box: tuple[float, float, float, float], scale: int, shape: tuple[int, ...], rim: int
) -> tuple[int, int, int, int]:
    """The box as drawn (outline included), clipped to the image, as a half-open rectangle."""
    rows, columns = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    return (
        min(max(x0 - rim, 0), columns),
        min(max(y0 - rim, 0), rows),
        min(max(x1 + rim + 1, 0), columns),
        min(max(y1 + rim + 1, 0), rows),
    )


def _draw_label(
    image: np.ndarray, text: str, rect: layout.Rect, font_scale: float, thickness: int
) -> None:
    (_, th), _ = cv2.getTextSize(text, _FONT, font_scale, thickness)
    pad = max(2, th // 4)
    image[rect.y0 : rect.y1, rect.x0 : rect.x1] = _BLACK
    cv2.putText(
        image,
        text,
        (rect.x0 + pad, rect.y0 + pad + th),
        _FONT,
        font_scale,
        _WHITE,
        thickness,
        cv2.LINE_AA,
    )


def _leader(image: np.ndarray, rect: layout.Rect, box: layout.Rect, thickness: int) -> None:
    """A thin line from the label to the nearest point of its box."""
    cx, cy = (rect.x0 + rect.x1) // 2, (rect.y0 + rect.y1) // 2
    tx = min(max(cx, box.x0), max(box.x1 - 1, box.x0))
    ty = min(max(cy, box.y0), max(box.y1 - 1, box.y0))
    sx = min(max(tx, rect.x0), rect.x1 - 1)
    sy = min(max(ty, rect.y0), rect.y1 - 1)
    cv2.line(image, (sx, sy), (tx, ty), _WHITE, max(1, thickness // 2), cv2.LINE_AA)


def banner_image(lines: list[str], width: int) -> np.ndarray:
    """A black uint8 banner ``width`` pixels wide with ``lines`` in white (the overlay's style)."""
    return _banner(lines, width, max(0.35, width / 1400.0), max(1, round(width / 700)))


def _banner(lines: list[str], width: int, font_scale: float, thickness: int) -> np.ndarray:
    margin = max(4, width // 100)
    wrapped = [
        part for line in lines for part in _wrap(line, width - 2 * margin, font_scale, thickness)
    ]
    (_, th), baseline = cv2.getTextSize("Ag", _FONT, font_scale, thickness)
    line_height = th + baseline + max(2, th // 2)
    banner = np.full((2 * margin + line_height * len(wrapped), width), _BLACK, dtype=np.uint8)
    for i, line in enumerate(wrapped):
        y = margin + i * line_height + th
        cv2.putText(banner, line, (margin, y), _FONT, font_scale, _WHITE, thickness, cv2.LINE_AA)
    banner[-max(1, thickness) :, :] = _WHITE  # rule separating the banner from the image
    return banner


def _text_width(text: str, font_scale: float, thickness: int) -> int:
    return int(cv2.getTextSize(text, _FONT, font_scale, thickness)[0][0])


def _wrap(
    text: str, max_width: int, font_scale: float, thickness: int, max_lines: int = 4
) -> list[str]:
    """Split ``text`` at spaces into lines that fit ``max_width``; cut the last with '...'."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and _text_width(candidate, font_scale, thickness) > max_width:
            lines.append(current)
            current = "  " + word
        else:
            current = candidate
    lines.append(current)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], " ".join(lines[max_lines - 1 :])]
    return [_fit(line, max_width, font_scale, thickness) for line in lines]


def _fit(text: str, max_width: int, font_scale: float, thickness: int) -> str:
    """Cut ``text`` (with '...') until it fits ``max_width`` pixels."""
    if _text_width(text, font_scale, thickness) <= max_width:
        return text
    while len(text) > 1:
        text = text[:-1]
        candidate = text.rstrip() + "..."
        if _text_width(candidate, font_scale, thickness) <= max_width:
            return candidate
    return text


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
