"""The study-level summary SR: the study's AI triage priority, amended when it changes.

Per-image SRs and overlays state only what concerns their image; the study's priority (which
a later image can change) lives here, in one Comprehensive SR per study, TID 1500:

- the first group (TID 1501, tracking identifier "Study AI triage") states the priority
  (99SPINENODE SN-102 = Abnormal / Normal / Not processed) and references every image
  analysed when the revision was written as a source of measurement; its TEXT comments
  give the counts, explicitly "when this revision was written";
- one group per analysed image states its triage result (SN-100) and probability and
  references that image (facts about that image, which later images cannot change).

Revision 1 is sent when the first image of the study finishes. When the study's priority
(``priority_key``) or its set of analysed images and their outcomes changes, a new revision is
sent, so that the newest revision always references every analysed image: a new document with a new SOP Instance UID
(``uids.study_document_uid``: study, bundle, revision) whose Predecessor Documents Sequence
references the revision it amends, as DICOM amends SR documents. All revisions share one
series per study and bundle. Nothing the document states can be made false by a later image
without a new revision: it carries no study-wide maximum or count that is not tied to the
revision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom._standard_utils import get_sop_class_iod_map
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ComprehensiveSRStorage, DigitalXRayImageStorageForPresentation

from spine_node.results import codes
from spine_node.results.equipment import algorithm_equipment, software_versions
from spine_node.results.options import ResultOptions
from spine_node.results.priority import StudyPriority, level_text, study_priority
from spine_node.results.sr import algorithm_identification
from spine_node.results.types import CascadeResult, ModelInfo, Status
from spine_node.results.uids import (
    ResultKind,
    bundle_key,
    device_uid,
    series_instance_uid,
    study_document_uid,
    tracking_uid,
    usable_or_derived,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyImageResult:
    """One analysed image of the study.

    Attributes
    ----------
    sop_instance_uid, series_instance_uid, sop_class_uid : str
        As received.
    result : CascadeResult
        Its latest result.
    """

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    result: CascadeResult


@dataclass(frozen=True)
class Predecessor:
    """The study summary revision being amended."""

    sop_instance_uid: str
    series_instance_uid: str


def priority_key(results: Sequence[tuple[str, CascadeResult]]) -> str:
    """Return what a new revision is opened on: the study's priority level.

    Parameters
    ----------
    results : sequence of (uid, CascadeResult)
        The study's analysed images.

    Returns
    -------
    str
        ``study_priority(results).level`` as its value ("positive", "not_processed" or
        "negative").
    """
    return study_priority(results).level.value


def build_study_sr(
    reference: Dataset,
    images: Sequence[StudyImageResult],
    model: ModelInfo,
    options: ResultOptions,
    *,
    revision: int,
    predecessor: Predecessor | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build revision ``revision`` of a study's summary SR.

    Parameters
    ----------
    reference : pydicom.Dataset
        Clean reference (``builder.reference_dataset``) of one image of the study: patient
        and study attributes, carried Study Instance UID.
    images : sequence of StudyImageResult
        Every analysed image of the study, in the order they finished.
    model : ModelInfo
        The bundle.
    options : ResultOptions
        Series number and description, manufacturer, institution.
    revision : int
        1 for the first document of the study, +1 per amendment.
    predecessor : Predecessor, optional
        The document this revision amends (required for revision > 1 when one was sent).

    Returns
    -------
    highdicom.sr.ComprehensiveSR
    """
    if not images:
        raise ValueError("a study summary needs at least one analysed image")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ValueError(f"revision must be an int >= 1, got {revision!r}")
    bundle = bundle_key(model)
    study_uid = str(reference.StudyInstanceUID)
    priority = study_priority([(i.sop_instance_uid, i.result) for i in images])
    algorithm = algorithm_identification(model, options.manufacturer)
    evidence = _evidence(reference, images)
    refs = [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(e.SOPClassUID),
            referenced_sop_instance_uid=str(e.SOPInstanceUID),
        )
        for e in evidence
    ]
    by_uid = {str(e.SOPInstanceUID): ref for e, ref in zip(evidence, refs, strict=True)}
    groups = [
        _study_group(
            study_uid, priority, images, algorithm, bundle, refs, revision, predecessor, model
        )
    ]
    for index, image in enumerate(images, start=1):
        uid = usable_or_derived(image.sop_instance_uid, "instance")
        groups.append(_image_group(image, index, uid, algorithm, bundle, by_uid[uid]))
    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(options.manufacturer, options.device_name, bundle),
            name=options.device_name,
            manufacturer_name=options.manufacturer,
            model_name=model.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PLAIN_RADIOGRAPHY,
        imaging_measurements=groups,
    )
    previous = None
    if predecessor is not None:
        item = Dataset()
        item.StudyInstanceUID = study_uid
        item.SeriesInstanceUID = predecessor.series_instance_uid
        item.SOPInstanceUID = predecessor.sop_instance_uid
        item.SOPClassUID = ComprehensiveSRStorage
        previous = [item]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_instance_uid(study_uid, ResultKind.STUDY_SR, bundle),
        series_number=options.study_sr_series_number,
        sop_instance_uid=study_document_uid(study_uid, bundle, revision),
        instance_number=revision,
        manufacturer=options.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=options.institution_name or None,
        institutional_department_name=options.institutional_department_name or None,
        series_description=options.series_description("study_sr", model),
        manufacturer_model_name=model.name[:64],
        software_versions=software_versions(model),
        coding_schemes=[codes.coding_scheme_identification()],
        contributing_equipment=[algorithm_equipment(model, options)],
        previous_versions=previous,
        specific_character_set=reference.SpecificCharacterSet,
    )
    logger.debug(
        "built study SR %s revision %d for study %s", sr.SOPInstanceUID, revision, study_uid
    )
    return sr


def _evidence(reference: Dataset, images: Sequence[StudyImageResult]) -> list[Dataset]:
    """The reference first (patient and study attributes come from it), then the others."""
    out = [reference]
    seen = {str(reference.SOPInstanceUID)}
    for image in images:
        uid = usable_or_derived(image.sop_instance_uid, "instance")
        if uid in seen:
            continue
        seen.add(uid)
        item = Dataset()
        item.StudyInstanceUID = reference.StudyInstanceUID
        item.SeriesInstanceUID = (
            usable_or_derived(image.series_instance_uid, "series")
            if image.series_instance_uid
            else reference.SeriesInstanceUID
        )
        item.SOPInstanceUID = uid
        item.SOPClassUID = (
            image.sop_class_uid
            if image.sop_class_uid in get_sop_class_iod_map()
            else DigitalXRayImageStorageForPresentation
        )
        out.append(item)
    return out


def _study_group(
    study_uid: str,
    priority: StudyPriority,
    images: Sequence[StudyImageResult],
    algorithm: hd.sr.AlgorithmIdentification,
    bundle: str,
    refs: list[hd.sr.SourceImageForMeasurementGroup],
    revision: int,
    predecessor: Predecessor | None,
    model: ModelInfo,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(study_uid, bundle, "study-triage"), identifier="Study AI triage"
        ),
        finding_type=codes.ABNORMAL if priority.level is Status.POSITIVE else None,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.STUDY_PRIORITY, value=codes.PRIORITY_CODES[priority.level]
            )
        ],
        source_images=refs,
    )
    highest = "n/a" if priority.max_score is None else f"{priority.max_score:.3f}"
    comments = [
        f"Study priority: {level_text(priority.level)}.",
        f"Study summary revision {revision}, written when {priority.n_images} image(s) of the "
        f"study had been analysed: {priority.n_positive} positive, "
        f"{priority.n_not_processed} not processed, highest probability {highest}. A new "
        "revision amends this one when another image is analysed or the priority changes.",
    ]
    if predecessor is not None:
        comments.append(f"Amends the study summary {predecessor.sop_instance_uid}.")
    comments.append(codes.NOT_FOR_DIAGNOSTIC_USE)
    if model.demo:
        comments.append(f"{codes.DEMO_TEXT}: it says nothing about the patient.")
    _add_comments(group, comments)
    return group


def _image_group(
    image: StudyImageResult,
    index: int,
    uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
    bundle: str,
    ref: hd.sr.SourceImageForMeasurementGroup,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    result = image.result
    verdict = {
        Status.POSITIVE: codes.ABNORMAL,
        Status.NEGATIVE: codes.NORMAL,
        Status.NOT_PROCESSED: codes.NOT_PROCESSED,
    }[result.status]
    measurements = []
    if result.score is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.PROBABILITY, value=float(result.score), unit=codes.UNIT_PROBABILITY
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(uid, bundle, "study-summary"), identifier=f"Image {index}"
        ),
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.TRIAGE_RESULT, value=verdict)
        ],
        source_images=[ref],
    )
    if result.status is Status.NOT_PROCESSED:
        _add_comments(group, [f"Not processed: {result.reason}"])
    elif result.findings:
        _add_comments(group, [f"{len(result.findings)} finding(s) localised"])
    return group


def _add_comments(group: hd.sr.MeasurementsAndQualitativeEvaluations, texts: list[str]) -> None:
    container = group[0]
    for text in texts:
        container.ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
