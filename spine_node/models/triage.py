"""Triage DERNet: three timm members, test-time augmentation, weighted soft vote.

Input convention (training and serving share it): a member receives the prepared grey triage
image, float32 in [0, 1], shape ``(N, 1, H, W)``; :class:`TriageMember` repeats it to three
channels (``in_chans=3``, so ImageNet weights load unchanged) and applies the member's own
mean/std from its timm pretrained config (EfficientNetV2: 0.5/0.5, DenseNet/ResNet: ImageNet).
Training must wrap its timm model in :class:`TriageMember` too and save
``member.model.state_dict()``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from spine_node.models.backend_onnxruntime import OnnxMembers
from spine_node.models.backend_torch import TorchMembers
from spine_node.models.bundle import BundleError, MemberSpec

log = logging.getLogger(__name__)

__all__ = [
    "TTA_VIEW_NAMES",
    "MemberRunner",
    "OnnxMembers",
    "TorchMembers",
    "TriageEnsemble",
    "TriageMember",
    "TriageOutput",
    "create_member",
    "load_member",
    "read_state_dict",
    "tta_views",
]

#: The TTA views in order; ``tta_views(image, n)`` returns the first ``n``.
TTA_VIEW_NAMES: tuple[str, ...] = ("identity", "hflip", "rotate+5", "zoom1.1", "gamma0.8")
_TTA_ROTATION_DEG = 5.0
_TTA_ZOOM = 1.1
_TTA_GAMMA = 0.8


def create_member(spec: MemberSpec, *, pretrained_file: Path | None = None) -> nn.Module:
    """Create a member's timm model with one output logit, never touching the network.

    Parameters
    ----------
    spec : MemberSpec
        Architecture and extra ``timm.create_model`` keyword arguments.
    pretrained_file : pathlib.Path, optional
        Local ImageNet state_dict (``torch.save`` or ``.safetensors``) used to initialise the
        backbone for training; its classifier is skipped.

    Returns
    -------
    torch.nn.Module
        The timm model (not wrapped).

    Raises
    ------
    ValueError
        When ``pretrained_file`` does not fit the architecture.
    """
    import timm

    if not isinstance(spec, MemberSpec):
        raise TypeError(f"spec must be a MemberSpec, got {type(spec).__name__}")
    kwargs = dict(spec.kwargs)
    for key in ("pretrained", "num_classes", "in_chans"):
        if key in kwargs:
            raise ValueError(f"member {spec.name} kwargs must not set {key!r}, got {kwargs[key]!r}")
    model: Any = timm.create_model(spec.arch, pretrained=False, num_classes=1, in_chans=3, **kwargs)
    if pretrained_file is not None:
        state = read_state_dict(Path(pretrained_file))
        classifier = model.get_classifier()
        prefixes = tuple(
            f"{name}." for name, module in model.named_modules() if module is classifier and name
        )
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches raise even when strict=False
            raise ValueError(
                f"pretrained_file {pretrained_file} does not fit {spec.arch}: "
                f"{str(exc).splitlines()[0]}"
            ) from exc
        missing = [k for k in missing if not k.startswith(prefixes)]
        if missing or unexpected:
            raise ValueError(
                f"pretrained_file {pretrained_file} does not fit {spec.arch}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        log.info("member %s initialised from %s (classifier skipped)", spec.name, pretrained_file)
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict saved with ``torch.save`` (weights only) or as ``.safetensors``.

    A ``model.`` prefix (state_dict of a whole :class:`TriageMember`) is stripped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state_dict, got {type(state).__name__}")
    return {
        (k[len("model.") :] if k.startswith("model.") else k): v
        for k, v in state.items()
        if k not in ("mean", "std")
    }


class TriageMember(nn.Module):
    """A timm model with the member's input convention built in.

    ``forward`` takes ``(N, 1, H, W)`` float in [0, 1] and returns ``(logit (N,), embedding (N, F))``,
    where the embedding is the pooled pre-logit feature vector (used by the content gate).
    The same graph is exported to ONNX, so both backends see identical preprocessing.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 values, got {mean!r} and {std!r}")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat grey to three channels and apply the member's mean/std."""
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map (the Grad-CAM target) for a grey [0, 1] batch."""
        return self.model.forward_features(self.normalise(x))  # type: ignore[operator]

    def head(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logit, embedding)`` from a feature map."""
        embedding = self.model.forward_head(feats, pre_logits=True)  # type: ignore[operator]
        logit = self.model.forward_head(feats)  # type: ignore[operator]
        return logit.reshape(-1), embedding.flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logit (N,), embedding (N, F))``."""
        return self.head(self.features(x))


def load_member(spec: MemberSpec, bundle_dir: Path) -> TriageMember:
    """Build a member and load its weights from the (already hash-checked) bundle.

    Raises
    ------
    BundleError
        When the weights file does not fit the architecture in the manifest.
    """
    model = create_member(spec)
    path = Path(bundle_dir) / spec.weights
    try:
        state = read_state_dict(path)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise BundleError(
            f"model bundle {bundle_dir}: triage member {spec.name} weights file {spec.weights} "
            f"does not fit {spec.arch} with kwargs {dict(spec.kwargs)} ({str(exc).splitlines()[0]})."
        ) from exc
    member = TriageMember(model, spec.mean, spec.std)
    member.eval()
    return member


def tta_views(image: np.ndarray, n: int) -> np.ndarray:
    """Return ``n`` test-time-augmentation views of one prepared triage image.

    Views, in order: identity, horizontal flip, rotation by +5 degrees, 1.1x centre zoom,
    gamma 0.8. All keep the image size and the [0, 1] range.

    Parameters
    ----------
    image : numpy.ndarray
        float32 ``(H, W)`` in [0, 1].
    n : int
        Number of views, 1 to 5 (1 turns TTA off).

    Returns
    -------
    numpy.ndarray
        float32 ``(n, H, W)``.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 2:
        raise ValueError(f"image must be a 2-D array, got {getattr(image, 'shape', image)!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(TTA_VIEW_NAMES):
        raise ValueError(f"n must be an int between 1 and {len(TTA_VIEW_NAMES)}, got {n!r}")
    img = image.astype(np.float32, copy=False)
    h, w = img.shape
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    views = [img]
    if n > 1:
        views.append(img[:, ::-1])
    if n > 2:
        theta = math.radians(_TTA_ROTATION_DEG)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        views.append(_affine(img, rot, centre))
    if n > 3:
        views.append(_affine(img, np.eye(2) / _TTA_ZOOM, centre))
    if n > 4:
        views.append(np.power(np.clip(img, 0.0, 1.0), _TTA_GAMMA))
    return np.ascontiguousarray(np.stack(views[:n]).astype(np.float32))


def _affine(img: np.ndarray, matrix: np.ndarray, centre: np.ndarray) -> np.ndarray:
    offset = centre - matrix @ centre
    out = ndimage.affine_transform(img, matrix, offset=offset, order=1, mode="nearest")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class TriageOutput:
    """Triage for a batch of images.

    Attributes
    ----------
    scores : numpy.ndarray
        ``(B,)`` ensemble probabilities.
    member_probs : Mapping[str, numpy.ndarray]
        ``(B,)`` TTA-averaged probability per member.
    embeddings : numpy.ndarray
        ``(B, sum F)`` concatenated pooled member embeddings of the identity view.
    """

    scores: np.ndarray
    member_probs: Mapping[str, np.ndarray]
    embeddings: np.ndarray


class MemberRunner(Protocol):
    """Runs every member on one batch ``(N, 1, H, W)`` float32 [0, 1]."""

    names: tuple[str, ...]

    def run(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return ``(logits (N,), embeddings (N, F))`` per member, in manifest order."""
        ...


def _sigmoid(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit  # no overflow warning for large logits

    return np.asarray(expit(x.astype(np.float64)), dtype=np.float64)


class TriageEnsemble:
    """DERNet: TTA views of each image batched together (images x views), averaged per member
    (sigmoid, then mean over views), weighted soft vote.

    Parameters
    ----------
    runner : MemberRunner
        Backend running the members.
    weights : Sequence[float]
        Ensemble weight per member (manifest order, sum 1).
    tta : int
        Views per image (1 to 5).
    max_batch : int
        Upper bound on views per forward pass; whole images are never split across passes.
    """

    def __init__(
        self, runner: MemberRunner, weights: Sequence[float], tta: int, *, max_batch: int = 40
    ) -> None:
        if len(weights) != len(runner.names):
            raise ValueError(f"weights must have {len(runner.names)} values, got {weights!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.runner = runner
        self.weights = np.asarray(weights, dtype=np.float64)
        self.tta = tta
        self.max_batch = max_batch

    def __call__(self, images: np.ndarray) -> TriageOutput:
        """Score a batch of prepared triage images.

        Parameters
        ----------
        images : numpy.ndarray
            float32 ``(B, H, W)`` in [0, 1].

        Returns
        -------
        TriageOutput
        """
        if not isinstance(images, np.ndarray) or images.ndim != 3 or images.shape[0] < 1:
            raise ValueError(
                f"images must be (B, H, W) with B >= 1, got {getattr(images, 'shape', None)}"
            )
        n = self.tta
        per_pass = max(1, self.max_batch // n)
        probs: list[list[np.ndarray]] = [[] for _ in self.runner.names]
        embs: list[list[np.ndarray]] = [[] for _ in self.runner.names]
        for start in range(0, images.shape[0], per_pass):
            chunk = images[start : start + per_pass]
            views = np.concatenate([tta_views(img, n) for img in chunk])[:, None]  # (b*n, 1, H, W)
            outputs = self.runner.run(views)
            for i, (logits, emb) in enumerate(outputs):
                p = _sigmoid(logits).reshape(chunk.shape[0], n)
                probs[i].append(p.mean(axis=1))
                embs[i].append(emb.reshape(chunk.shape[0], n, -1)[:, 0])
        member_probs = {name: np.concatenate(probs[i]) for i, name in enumerate(self.runner.names)}
        stacked = np.stack([member_probs[name] for name in self.runner.names], axis=1)
        scores = np.clip(stacked @ self.weights, 0.0, 1.0)
        embeddings = np.concatenate([np.concatenate(e) for e in embs], axis=1)
        return TriageOutput(scores=scores, member_probs=member_probs, embeddings=embeddings)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Return the concatenated pooled member embeddings of the identity view.

        Parameters
        ----------
        images : numpy.ndarray
            float32 ``(B, H, W)`` prepared triage images in [0, 1].

        Returns
        -------
        numpy.ndarray
            ``(B, sum F)`` float32, the same vectors the content gate sees during triage.
        """
        if not isinstance(images, np.ndarray) or images.ndim != 3 or images.shape[0] < 1:
            raise ValueError(
                f"images must be (B, H, W) with B >= 1, got {getattr(images, 'shape', None)}"
            )
        chunks = []
        for start in range(0, images.shape[0], self.max_batch):
            batch = images[start : start + self.max_batch, None].astype(np.float32)
            chunks.append(np.concatenate([emb for _, emb in self.runner.run(batch)], axis=1))
        return np.concatenate(chunks)
