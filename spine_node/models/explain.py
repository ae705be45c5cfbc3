"""Class activation heatmaps for the triage members (PyTorch backend only).

Two methods, both from the gradient of the "abnormal" logit with respect to a member's last
feature map ``A`` (``(C, h, w)``):

* ``gradcam`` (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization", ICCV): channel weights = spatial mean of the gradients,
  CAM = ReLU(sum_c w_c A_c);
* ``layercam`` (Jiang et al. 2021, "LayerCAM: Exploring Hierarchical Class Activation Maps
  for Localization", IEEE TIP 30): a weight per channel *and* location, the positive gradient,
  CAM = ReLU(sum_c ReLU(dy/dA_c) * A_c). Computed at the last feature map only (the paper also
  fuses shallower layers; one layer keeps the map comparable with Grad-CAM's).

Each member's CAM is resized to the triage image and scaled to [0, 1]; the ensemble heatmap
is the ensemble-weighted mean of the members' maps, resized to the source image.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from spine_node.models.triage import TriageMember

log = logging.getLogger(__name__)

#: Heatmap methods: Grad-CAM (Selvaraju et al. 2017) and LayerCAM (Jiang et al. 2021).
HEATMAP_METHODS: tuple[str, ...] = ("gradcam", "layercam")


def check_method(method: str) -> str:
    """Return ``method`` when it is one of :data:`HEATMAP_METHODS`, else raise ValueError."""
    if method not in HEATMAP_METHODS:
        raise ValueError(f"heatmap method must be one of {HEATMAP_METHODS}, got {method!r}")
    return method


def gradcam(
    member: TriageMember,
    image: np.ndarray,
    device: torch.device | None = None,
    method: str = "gradcam",
) -> np.ndarray:
    """Grad-CAM (or LayerCAM) of one member on one prepared triage image.

    Parameters
    ----------
    member : TriageMember
        The member (eval mode).
    image : numpy.ndarray
        float32 ``(H, W)`` in [0, 1] (the prepared triage image).
    device : torch.device, optional
        Where the member lives; defaults to the device of its first parameter.
    method : str
        ``"gradcam"`` or ``"layercam"`` (:data:`HEATMAP_METHODS`).

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` in [0, 1] (all zeros when the gradient is zero everywhere).
    """
    check_method(method)
    if not isinstance(member, TriageMember):
        raise TypeError(f"member must be a TriageMember, got {type(member).__name__}")
    if not isinstance(image, np.ndarray) or image.ndim != 2:
        raise ValueError(f"image must be a 2-D array, got {getattr(image, 'shape', image)!r}")
    if device is None:
        device = next(member.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None].to(device)
    member.eval()
    with torch.inference_mode(False), torch.enable_grad():
        feats = member.features(x.clone())
        feats.retain_grad()
        logit, _ = member.head(feats)
        member.zero_grad(set_to_none=True)
        logit.sum().backward()
        grads = feats.grad
        if grads is None:  # pragma: no cover - autograd always fills it for a leaf with retain_grad
            raise RuntimeError("Grad-CAM: no gradient reached the feature map")
        if method == "layercam":
            weights = torch.relu(grads)  # one weight per channel and location
        else:
            weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * feats).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam.float(), size=image.shape, mode="bilinear", align_corners=False)[0, 0]
    out = cam.cpu().numpy().astype(np.float32)
    return _unit(out)


def _unit(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def ensemble_gradcam(
    members: Mapping[str, TriageMember],
    weights: Sequence[float],
    image: np.ndarray,
    source_shape: tuple[int, int],
    method: str = "gradcam",
) -> np.ndarray:
    """Ensemble-weighted Grad-CAM (or LayerCAM), resized to the source image.

    Parameters
    ----------
    members : Mapping[str, TriageMember]
        Members in manifest order.
    weights : Sequence[float]
        Ensemble weights (same order).
    image : numpy.ndarray
        float32 ``(H, W)`` prepared triage image (the whole source, resized to a square).
    source_shape : tuple of int
        ``(rows, columns)`` of the source image.
    method : str
        ``"gradcam"`` or ``"layercam"``.

    Returns
    -------
    numpy.ndarray
        float32 ``source_shape`` heatmap in [0, 1].
    """
    if len(weights) != len(members):
        raise ValueError(f"weights must have {len(members)} values, got {weights!r}")
    rows, cols = int(source_shape[0]), int(source_shape[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"source_shape must be positive, got {source_shape!r}")
    total = np.zeros(image.shape, np.float32)
    for w, member in zip(weights, members.values(), strict=True):
        if w > 0:
            total += float(w) * gradcam(member, image, method=method)
    t = torch.from_numpy(total)[None, None]
    # The triage image is the whole source resized to a square, so resizing back maps it exactly.
    resized = F.interpolate(t, size=(rows, cols), mode="bilinear", align_corners=False)[0, 0]
    return _unit(resized.numpy())


def heatmap_to_json(heatmap: np.ndarray, method: str, max_side: int = 64) -> dict[str, object]:
    """A heatmap as JSON: reduced to at most ``max_side`` pixels a side, values to 3 decimals.

    Parameters
    ----------
    heatmap : numpy.ndarray
        float ``(rows, columns)`` in [0, 1], source-image shape.
    method : str
        The method that made it (recorded).
    max_side : int
        Longest side of the grid written (area-averaged; the maps are coarse to begin with).

    Returns
    -------
    dict
        ``method``, ``source_shape`` ``[rows, columns]``, ``shape`` ``[r, c]`` of ``values``
        (a list of rows; grid cell ``(i, j)`` covers source rows ``i * rows / r`` to
        ``(i + 1) * rows / r``, columns likewise).
    """
    import cv2

    check_method(method)
    array = np.asarray(heatmap, dtype=np.float32)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {array.shape}")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive int, got {max_side!r}")
    rows, cols = array.shape
    scale = min(1.0, max_side / max(rows, cols))
    r, c = max(1, round(rows * scale)), max(1, round(cols * scale))
    small = (
        array if (r, c) == (rows, cols) else cv2.resize(array, (c, r), interpolation=cv2.INTER_AREA)
    )
    return {
        "method": method,
        "source_shape": [int(rows), int(cols)],
        "shape": [int(r), int(c)],
        "values": np.round(np.clip(small, 0.0, 1.0), 3).tolist(),
    }
