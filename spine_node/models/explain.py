"""Grad-CAM heatmaps for the triage members (PyTorch backend only).

For each member: gradient of the "abnormal" logit with respect to the last feature map,
channel weights = spatial mean of the gradients, CAM = ReLU(sum of weighted maps), resized to
the source image and scaled to [0, 1]. The ensemble heatmap is the ensemble-weighted mean of
the members' normalised CAMs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from spine_node.models.triage import TriageMember

log = logging.getLogger(__name__)


def gradcam(
    member: TriageMember, image: np.ndarray, device: torch.device | None = None
) -> np.ndarray:
    """Grad-CAM of one member on one prepared triage image.

    Parameters
    ----------
    member : TriageMember
        The member (eval mode).
    image : numpy.ndarray
        float32 ``(H, W)`` in [0, 1] (the prepared triage image).
    device : torch.device, optional
        Where the member lives; defaults to the device of its first parameter.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` in [0, 1] (all zeros when the gradient is zero everywhere).
    """
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
) -> np.ndarray:
    """Ensemble-weighted Grad-CAM, resized to the source image.

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
            total += float(w) * gradcam(member, image)
    t = torch.from_numpy(total)[None, None]
    # The triage image is the whole source resized to a square, so resizing back maps it exactly.
    resized = F.interpolate(t, size=(rows, cols), mode="bilinear", align_corners=False)[0, 0]
    return _unit(resized.numpy())
