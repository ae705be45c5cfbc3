"""Comprehensive SR, TID 1500 Measurement Report, for one analysed image.

Content tree (every group references the source image):

- observer context: this node as a device (TID 1004: UID, name, manufacturer, model = bundle
  name); procedure reported: SCT 168537006 "Plain radiography";
- one TID 1501 group "AI triage": Probability (DCM 122157) and Threshold Value (DCM 122411)
  in UCUM ``{probability}``, the triage as a qualitative evaluation (99SPINENODE SN-100 =
  SCT Abnormal / SCT Normal / 99SPINENODE "Not processed"), algorithm identification (TID 4019, parameters include member weights and hashes), and
  TEXT comments (DCM 121106): the outcome in words, the reason when not processed, the
  member probabilities, "NOT FOR DIAGNOSTIC USE" and, for a demo bundle, "DEMO MODEL -
  PHANTOM-TRAINED";
- one TID 1410 planar ROI group per finding: a closed 5-point POLYLINE around the box in
  source pixel coordinates, the finding code, its probability, tracking identifier and UID,
  the Meyerding grade when graded.

The document is COMPLETE, PRELIMINARY and UNVERIFIED: a machine result that nobody has
checked. It says nothing about the study as a whole (a later image could make that false):
the study's priority lives in the study summary SR (``results.study``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom._standard_utils import is_attribute_in_iod
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from spine_node.results import codes
from spine_node.results.equipment import algorithm_equipment, software_versions
from spine_node.results.options import ResultOptions
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status, display_label
from spine_node.results.uids import (
    ResultKind,
    bundle_key,
    device_uid,
    series_instance_uid,
    sop_instance_uid,
    tracking_uid,
)

logger = logging.getLogger(__name__)


def build_sr(
    reference: Dataset,
    result: CascadeResult,
    model: ModelInfo,
    options: ResultOptions,
    *,
    frame_number: int | None = None,
    notes: Sequence[str] = (),
) -> hd.sr.ComprehensiveSR:
    """Build the TID 1500 measurement report for one image.

    Parameters
    ----------
    reference : pydicom.Dataset
        Clean source reference from ``builder.reference_dataset``.
    result : CascadeResult
        The cascade's answer.
    model : ModelInfo
        The bundle that produced it.
    options : ResultOptions
        Series number, description, manufacturer, institution.
    frame_number : int, optional
        1-based frame the boxes refer to, for multi-frame sources.
    notes : sequence of str
        Sentences about the source written as TEXT comments (e.g. a source UID that was
        unusable and replaced).

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        The SR, in the source study, in the SR result series.
    """
    if not isinstance(result, CascadeResult):
        raise TypeError(f"result must be a CascadeResult, got {type(result).__name__}")
    if frame_number is not None and frame_number < 1:
        raise ValueError(f"frame_number must be >= 1, got {frame_number!r}")
    bundle = bundle_key(model)
    source_uid = str(reference.SOPInstanceUID)
    algorithm = algorithm_identification(model, options.manufacturer)

    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(options.manufacturer, options.device_name, bundle),
            name=options.device_name,
            manufacturer_name=options.manufacturer,
            model_name=model.name,
        ),
    )
    groups: list[Any] = [
        _triage_group(reference, result, model, algorithm, bundle, notes)
    ]
    for index, finding in enumerate(result.findings, start=1):
        groups.append(_finding_group(reference, finding, index, algorithm, bundle, frame_number))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PLAIN_RADIOGRAPHY,
        imaging_measurements=groups,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[reference],
        content=report[0],
        series_instance_uid=series_instance_uid(
            str(reference.StudyInstanceUID), ResultKind.SR, bundle
        ),
        series_number=options.sr_series_number,
        sop_instance_uid=sop_instance_uid(source_uid, ResultKind.SR, bundle),
        instance_number=1,
        manufacturer=options.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=options.institution_name or None,
        institutional_department_name=options.institutional_department_name or None,
        series_description=options.series_description("sr", model),
        manufacturer_model_name=model.name[:64],
        software_versions=software_versions(model),
        coding_schemes=[codes.coding_scheme_identification()],
        contributing_equipment=[algorithm_equipment(model, options)],
        specific_character_set=reference.SpecificCharacterSet,
    )
    logger.debug("built SR %s for %s", sr.SOPInstanceUID, source_uid)
    return sr


def algorithm_identification(model: ModelInfo, manufacturer: str) -> hd.sr.AlgorithmIdentification:
    """Return TID 4019 for the bundle: name, version, one parameter item per setting.

    Parameters
    ----------
    model : ModelInfo
        Its ``parameters`` (member weights, hashes, threshold, TTA views...) are written as
        ``key=value`` items (values as compact JSON), sorted by key.
    manufacturer : str
        Algorithm manufacturer.

    Returns
    -------
    highdicom.sr.AlgorithmIdentification
        The template.
    """
    parameters = [
        f"{key}={_compact(value)}" for key, value in sorted(model.parameters.items(), key=_key)
    ]
    if model.demo:
        parameters.append(f"demo={codes.DEMO_TEXT}")
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=parameters or None,
        manufacturer=manufacturer,
    )


def outcome_sentence(result: CascadeResult) -> str:
    """Return the outcome of the triage in one sentence."""
    if result.status is Status.NOT_PROCESSED:
        return f"Not processed: {result.reason}"
    verdict = "abnormal" if result.status is Status.POSITIVE else "normal"
    sentence = (
        f"AI triage {verdict}: probability {result.score:.3f} (threshold {result.threshold:.3f})"
    )
    if result.status is Status.NEGATIVE:
        return sentence + "; no abnormality detected by the algorithm."
    if result.findings:
        names = ", ".join(sorted({display_label(f.label) for f in result.findings}))
        return sentence + f"; {len(result.findings)} finding(s): {names}."
    return sentence + "; no lesion localised by the detector."


def _triage_group(
    reference: Dataset,
    result: CascadeResult,
    model: ModelInfo,
    algorithm: hd.sr.AlgorithmIdentification,
    bundle: str,
    notes: Sequence[str],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    source_uid = str(reference.SOPInstanceUID)
    measurements = []
    if result.score is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.PROBABILITY,
                value=float(result.score),
                unit=codes.UNIT_PROBABILITY,
            )
        )
    if result.threshold is not None:  # None: refused before the bundle's triage was known
        measurements.append(
            hd.sr.Measurement(
                name=codes.THRESHOLD_VALUE,
                value=float(result.threshold),
                unit=codes.UNIT_PROBABILITY,
            )
        )
    verdict = {
        Status.POSITIVE: codes.ABNORMAL,
        Status.NEGATIVE: codes.NORMAL,
        Status.NOT_PROCESSED: codes.NOT_PROCESSED,
    }[result.status]
    evaluations = [hd.sr.QualitativeEvaluation(name=codes.TRIAGE_RESULT, value=verdict)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source_uid, bundle, "triage"), identifier="AI triage"
        ),
        finding_type=codes.ABNORMAL if result.status is Status.POSITIVE else None,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(reference.SOPClassUID),
                referenced_sop_instance_uid=source_uid,
            )
        ],
    )
    comments = [outcome_sentence(result)]
    if result.status is Status.NOT_PROCESSED:
        comments.append(f"Reason: {result.reason}")
    for member, score in sorted(result.member_scores.items()):
        comments.append(f"Member {member} probability: {float(score):.4f}")
    comments.extend(notes)
    if model.intended_use:
        comments.append(f"Intended use: {model.intended_use}")
    comments.append(codes.NOT_FOR_DIAGNOSTIC_USE)
    if model.demo:
        comments.append(
            f"{codes.DEMO_TEXT}: this result comes from a model trained on phantoms; "
            "it says nothing about the patient."
        )
    container = group[0]
    for text in comments:
        container.ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _finding_group(
    reference: Dataset,
    finding: Finding,
    index: int,
    algorithm: hd.sr.AlgorithmIdentification,
    bundle: str,
    frame_number: int | None,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    source_uid = str(reference.SOPInstanceUID)
    sop_class = str(reference.SOPClassUID)
    frames = (
        [frame_number]
        if frame_number is not None and is_attribute_in_iod("NumberOfFrames", sop_class)
        else None
    )
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box_polyline(finding.box, reference),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=sop_class,
            referenced_sop_instance_uid=source_uid,
            referenced_frame_numbers=frames,
        ),
    )
    evaluations = []
    if finding.grade is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=codes.MEYERDING_GRADE, value=codes.meyerding_code(finding.grade)
            )
        )
    site = codes.FINDING_SITES.get(finding.label)
    label = display_label(finding.label)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source_uid, bundle, f"finding-{index}"),
            identifier=f"Finding {index}: {label}",
        ),
        referenced_region=region,
        finding_type=codes.finding_code(finding.label),
        finding_sites=[hd.sr.FindingSite(anatomic_location=site)] if site else None,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.PROBABILITY,
                value=float(finding.score),
                unit=codes.UNIT_PROBABILITY,
            )
        ],
        qualitative_evaluations=evaluations or None,
    )


def box_polyline(box: tuple[float, float, float, float], reference: Dataset) -> np.ndarray:
    """Return a closed 5-point polyline (column, row) around ``box``, clipped to the image.

    Parameters
    ----------
    box : tuple of float
        ``(xmin, ymin, xmax, ymax)`` in source pixel coordinates.
    reference : pydicom.Dataset
        Provides Rows and Columns for clipping (no clipping when absent).

    Returns
    -------
    numpy.ndarray
        float32 array of shape (5, 2); the last point repeats the first.
    """
    xmin, ymin, xmax, ymax = (float(v) for v in box)
    columns = float(reference.get("Columns") or 0) or None
    rows = float(reference.get("Rows") or 0) or None
    xmin, ymin = max(xmin, 0.0), max(ymin, 0.0)
    if columns is not None:
        xmax = min(xmax, columns)
    if rows is not None:
        ymax = min(ymax, rows)
    return np.array(
        [[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax], [xmin, ymin]],
        dtype=np.float32,
    )


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        return str(value)


def _key(item: tuple[str, Any]) -> str:
    return str(item[0])


__all__ = ["algorithm_identification", "box_polyline", "build_sr", "outcome_sentence"]
