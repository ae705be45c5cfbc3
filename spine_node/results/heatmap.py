"""Heatmap Secondary Capture: where the triage model looked, blended over the source image.

Optional (``results.heatmap``, off by default), in its own series beside the overlay, with the
same UID rules (``results.uids``, kind ``heatmap``: one series per study and bundle, one SOP
Instance UID per source image and bundle, so a re-run replaces rather than duplicates).

Choice: 8-bit RGB. The heatmap (``CascadeResult.heatmap``: the ensemble-weighted Grad-CAM or
LayerCAM of the triage members, source-image shape, [0, 1]; ``spine_node.models.explain``) is
coloured with OpenCV's JET map and blended over the grey display image with a per-pixel
opacity of ``0.6 * heat``, so regions the model did not weigh show the image unchanged. The
image is scaled to at most ``MAX_SIDE`` pixels on its longest side (the maps come from a
12 x 12 feature grid at 384 px, finer pixels add nothing) and narrow images are enlarged as
the overlay does. The overlay's banner style sits above the image: the method, the triage
result, the model and "NOT FOR DIAGNOSTIC USE" (and the demo warning for a demo bundle).
"""

from __future__ import annotations

import logging

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from spine_node import imaging
from spine_node.results.options import ResultOptions
from spine_node.results.overlay import (
    banner_image,
    banner_lines,
    secondary_capture,
    upscale_factor,
)
from spine_node.results.types import CascadeResult, ModelInfo
from spine_node.results.uids import ResultKind

logger = logging.getLogger(__name__)

#: Longest side of the heatmap image, in pixels (banner excluded).
MAX_SIDE = 1024
#: Largest opacity of the colour map (where the heat is 1).
MAX_OPACITY = 0.6
METHOD_NAMES = {"gradcam": "Grad-CAM", "layercam": "LayerCAM"}


def render_heatmap(
    pixels: np.ndarray, heatmap: np.ndarray, lines: list[str]
) -> tuple[np.ndarray, float]:
    """Blend a heatmap over a display image and put a banner above.

    Parameters
    ----------
    pixels : numpy.ndarray
        float ``(rows, columns)`` in [0, 1] or uint8 (``imaging.to_uint8``), display polarity.
    heatmap : numpy.ndarray
        float ``(rows, columns)`` in [0, 1] (same shape).
    lines : list of str
        Banner text (ASCII).

    Returns
    -------
    (numpy.ndarray, float)
        uint8 RGB ``(banner_rows + r, c, 3)`` and the scale applied to the image.
    """
    image = imaging.unit_float(np.asarray(pixels))
    heat = np.asarray(heatmap, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"pixels must be a non-empty 2-D array, got shape {image.shape}")
    if heat.shape != image.shape:
        raise ValueError(f"heatmap shape {heat.shape} differs from the image's {image.shape}")
    rows, cols = image.shape
    scale = float(upscale_factor(cols)) if cols < MAX_SIDE else 1.0
    scale = min(scale, MAX_SIDE / max(rows, cols)) if max(rows, cols) * scale > MAX_SIDE else scale
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    if size != (cols, rows):
        shrink = scale < 1
        fine = cv2.INTER_AREA if shrink else cv2.INTER_NEAREST
        image = np.asarray(cv2.resize(image, size, interpolation=fine), dtype=np.float32)
        smooth = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        heat = np.asarray(cv2.resize(heat, size, interpolation=smooth), dtype=np.float32)
    grey = np.clip(np.rint(np.nan_to_num(image) * 255.0), 0, 255).astype(np.uint8)
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
    colour = cv2.cvtColor(
        cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET),
        cv2.COLOR_BGR2RGB,
    ).astype(np.float32)
    alpha = (MAX_OPACITY * heat)[..., None]
    blended = (1 - alpha) * grey[..., None].astype(np.float32) + alpha * colour
    body = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    banner = np.repeat(banner_image(lines, body.shape[1])[..., None], 3, axis=2)
    return np.ascontiguousarray(np.concatenate([banner, body], axis=0)), scale


def build_heatmap(
    reference: Dataset,
    image: imaging.SourceImage,
    result: CascadeResult,
    model: ModelInfo,
    options: ResultOptions,
) -> hd.sc.SCImage:
    """Build the heatmap Secondary Capture of one image.

    Parameters
    ----------
    reference : pydicom.Dataset
        Clean source reference from ``builder.reference_dataset``.
    image : imaging.SourceImage
        Decoded display image of the source.
    result : CascadeResult
        The cascade's answer, with ``heatmap`` (source-image shape).
    model, options : ModelInfo, ResultOptions
        Bundle, series number and description, ``heatmap_method``.

    Returns
    -------
    highdicom.sc.SCImage
        8-bit RGB, series ``heatmap_series_number``, UIDs of kind ``heatmap``.

    Raises
    ------
    ValueError
        When the result has no heatmap or one of another shape than the image.
    """
    if result.heatmap is None:
        raise ValueError(f"result {result.sop_instance_uid} has no heatmap")
    name = METHOD_NAMES[options.heatmap_method]
    lines = [
        f"AI HEATMAP ({name}): where the triage model found evidence for 'abnormal'",
        *banner_lines(result, model),
    ]
    canvas, scale = render_heatmap(image.pixels, np.asarray(result.heatmap), lines)
    banner_rows = canvas.shape[0] - round(image.rows * scale)
    return secondary_capture(
        reference,
        image,
        canvas,
        model,
        options,
        kind=ResultKind.HEATMAP,
        series_number=options.heatmap_series_number,
        series_description=options.series_description("heatmap", model),
        derivation=(
            f"{name} heatmap of the AI triage score blended over the source image"
            + (f" (scaled x{scale:.3g})" if scale != 1 else "")
            + f"; banner of {banner_rows} rows added above"
        )[:1024],
    )
