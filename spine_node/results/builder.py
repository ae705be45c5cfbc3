"""Build every DICOM result object for one analysed image.

``build_results`` returns datasets; writing and sending happen elsewhere. The SR is always
built; the Secondary Capture overlay whenever the cascade decoded the image
(``CascadeResult.display``, decoded once in the isolated decoder; the builder never decodes
the source again), negative and not-processed results included; the GSPS when enabled, when there are findings and the source is a single-frame
grayscale image.

Sloppy sources are accepted: ``reference.source_reference`` copies only what the result
objects need (identity carried as received when usable, text decoded, recovered and cut to
VR limits, see ``results.reference`` and ``results.text``). Everything we write is UTF-8
(``ISO_IR 192``). Every object names the algorithm in its Contributing Equipment Sequence
(``equipment.algorithm_equipment``), the IHE AI Results way.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset

from spine_node import imaging
from spine_node.results import gsps as gsps_module
from spine_node.results import heatmap as heatmap_module
from spine_node.results import overlay as overlay_module
from spine_node.results import sr as sr_module
from spine_node.results.options import ResultOptions
from spine_node.results.reference import (
    OUTPUT_CHARACTER_SET,
    reference_dataset,
    source_reference,
    source_sop_instance_uid,
)
from spine_node.results.types import CascadeResult, ModelInfo

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_CHARACTER_SET",
    "ResultOptions",
    "build_results",
    "build_sr_object",
    "check_inputs",
    "frame_number",
    "image_objects",
    "reference_dataset",
]


def build_results(
    source: Dataset,
    result: CascadeResult,
    model: ModelInfo,
    options: ResultOptions | None = None,
) -> list[Dataset]:
    """Build the result objects for one source image.

    Parameters
    ----------
    source : pydicom.Dataset
        The image as received (its pixel data is not read: the overlay is drawn on
        ``result.display``).
    result : CascadeResult
        The cascade's answer for it (``result.sop_instance_uid`` must match the source),
        with the display image the cascade decoded (``display``; None gives no overlay).
    model : ModelInfo
        The bundle that produced ``result``.
    options : ResultOptions, optional
        Series numbers, descriptions and switches (defaults when None).

    Returns
    -------
    list of pydicom.Dataset
        ``[SR, SC?, heatmap SC?, GSPS?]``: SR always, SC when the cascade decoded the image
        (and enabled), the heatmap SC when enabled and the cascade computed a heatmap, GSPS
        when enabled, with findings, on a single-frame grayscale source whose presentation
        can be reproduced.
    """
    options = check_inputs(source, result, model, options)
    return [
        build_sr_object(source, result, model, options, frame_number(source, result.display)),
        *image_objects(source, result, model, options),
    ]


def check_inputs(
    source: object, result: object, model: object, options: object
) -> ResultOptions:
    """Check :func:`build_results`' arguments; return ``options`` (defaults when None).

    Raises
    ------
    TypeError
        An argument of the wrong type (``result.display`` included).
    ValueError
        ``result.sop_instance_uid`` is not the source's SOP Instance UID.
    """
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    if not isinstance(result, CascadeResult):
        raise TypeError(f"result must be a CascadeResult, got {type(result).__name__}")
    if not isinstance(model, ModelInfo):
        raise TypeError(f"model must be a ModelInfo, got {type(model).__name__}")
    if options is None:
        options = ResultOptions()
    if not isinstance(options, ResultOptions):
        raise TypeError(f"options must be a ResultOptions, got {type(options).__name__}")
    source_uid = source_sop_instance_uid(source)
    if result.sop_instance_uid != source_uid:
        raise ValueError(
            f"result.sop_instance_uid {result.sop_instance_uid!r} does not match the source "
            f"SOP Instance UID {source_uid!r}"
        )
    image = result.display
    if image is not None and not isinstance(image, imaging.SourceImage):
        raise TypeError(
            f"result.display must be an imaging.SourceImage or None, got {type(image).__name__}"
        )
    return options


def build_sr_object(
    source: Dataset,
    result: CascadeResult,
    model: ModelInfo,
    options: ResultOptions,
    frame: int | None,
) -> Dataset:
    """The image's SR (TID 1500), the first object of :func:`build_results`.

    It needs no pixels: ``source`` may come without pixel data and ``result`` without its
    display image or heatmap (how :class:`spine_node.results.parallel.ParallelBuilder` sends
    them to its helper process).

    Parameters
    ----------
    source, result, model, options
        As :func:`build_results` (checked there).
    frame : int or None
        1-based frame the findings refer to (:func:`frame_number`); None for a single frame.
    """
    source_ref = source_reference(source)
    return sr_module.build_sr(
        source_ref.dataset,
        result,
        model,
        options,
        frame_number=frame,
        notes=tuple(d.sentence() for d in source_ref.derived_uids),
    )


def image_objects(
    source: Dataset, result: CascadeResult, model: ModelInfo, options: ResultOptions
) -> list[Dataset]:
    """The objects of :func:`build_results` after the SR: ``[SC?, heatmap SC?, GSPS?]``."""
    source_uid = source_sop_instance_uid(source)
    reference = source_reference(source).dataset
    image = result.display
    if image is None and options.secondary_capture:
        logger.info(
            "no overlay for %s: the cascade has no decoded image of it (%s)",
            source_uid,
            result.reason or "not decoded",
        )
    objects: list[Dataset] = []
    if options.secondary_capture and image is not None:
        objects.append(overlay_module.build_overlay(reference, image, result, model, options))
    if options.heatmap and image is not None:
        if result.heatmap is None:
            logger.info("no heatmap image for %s: the cascade computed no heatmap", source_uid)
        else:
            objects.append(heatmap_module.build_heatmap(reference, image, result, model, options))
    if options.gsps and result.findings:
        presentation_state = _try_gsps(reference, result, model, options)
        if presentation_state is not None:
            objects.append(presentation_state)
    return objects


def _try_gsps(
    reference: Dataset, result: CascadeResult, model: ModelInfo, options: ResultOptions
) -> Dataset | None:
    """Build the optional GSPS; None (with the reason logged) when it cannot be built.

    The GSPS is a convenience: whatever goes wrong with it (an odd source presentation, a
    value highdicom refuses) must never cost the image its SR and overlay.
    """
    if not gsps_module.supports(reference):
        logger.info(
            "no GSPS for %s: the source is not a single-frame grayscale image (%r)",
            reference.SOPInstanceUID,
            reference.get("PhotometricInterpretation"),
        )
        return None
    try:
        return gsps_module.build_gsps(reference, result, model, options)
    except gsps_module.GSPSUnavailable as exc:
        logger.info("no GSPS for %s: %s", reference.SOPInstanceUID, exc)
    except Exception as exc:  # optional object: log and go on without it
        logger.warning(
            "no GSPS for %s: building it failed (%s: %s)",
            reference.SOPInstanceUID,
            type(exc).__name__,
            exc,
        )
    return None


def _n_frames(source: Dataset) -> int:
    try:
        return int(source.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def frame_number(source: Dataset, image: imaging.SourceImage | None) -> int | None:
    """1-based frame the findings refer to, for multi-frame sources; None otherwise."""
    if _n_frames(source) <= 1:
        return None
    return (image.frame if image is not None else 0) + 1
