"""PyTorch backend: triage members and the detector on one device, at a chosen precision.

CPU: weights and inputs in channels_last memory format (oneDNN's fast convolution layout);
``bf16`` runs under ``torch.autocast("cpu", torch.bfloat16)``. CUDA: ``fp16`` or ``bf16`` under
``torch.autocast("cuda")``, channels_last with them (tensor-core convolutions are NHWC).
Outputs always come back as float32 NumPy arrays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from spine_node.models.runtime import Precision

_AUTOCAST_DTYPE = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def _autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    if precision is Precision.FP16 and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device, got {device}")
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPE[precision])


def _default_channels_last(
    device: torch.device, precision: Precision, wanted: bool | None
) -> bool:
    if wanted is not None:
        return wanted
    return device.type == "cpu" or precision is not Precision.FP32


def _prepare(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    module = module.to(device).eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module


def _input(batch: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class RawHead(nn.Module):
    """Wrap an ultralytics DetectionModel so ``forward`` returns only the decoded head tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(N, 4 + nc, anchors)``."""
        out = self.model(x)
        return out[0] if isinstance(out, tuple | list) else out


class TorchMembers:
    """Triage members on one device, weights loaded once.

    Parameters
    ----------
    members : Mapping[str, torch.nn.Module]
        :class:`spine_node.models.triage.TriageMember` per name, in manifest order.
    device : torch.device
        Where they run.
    precision : Precision
        fp32, bf16 (CPU or CUDA autocast) or fp16 (CUDA autocast).
    channels_last : bool, optional
        channels_last memory format; default: on the CPU, and on CUDA at fp16/bf16.
    """

    def __init__(
        self,
        members: Mapping[str, nn.Module],
        device: torch.device,
        precision: Precision = Precision.FP32,
        *,
        channels_last: bool | None = None,
    ) -> None:
        self.names = tuple(members)
        self.device = torch.device(device)
        self.precision = Precision(precision)
        _autocast(self.device, self.precision)  # fails early for fp16 on the CPU
        self.channels_last = _default_channels_last(self.device, self.precision, channels_last)
        self.members = {
            name: _prepare(m, self.device, self.channels_last) for name, m in members.items()
        }

    def run(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return ``(logits (N,), embeddings (N, F))`` per member for one batch ``(N, 1, H, W)``."""
        x = _input(batch, self.device, self.channels_last)
        out = []
        with torch.inference_mode(), _autocast(self.device, self.precision):
            for name in self.names:
                logit, emb = self.members[name](x)
                out.append((logit.float().cpu().numpy(), emb.float().cpu().numpy()))
        return out


class TorchDetectorNet:
    """The detector's raw head on one device (see :class:`TorchMembers` for the parameters)."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        precision: Precision = Precision.FP32,
        *,
        channels_last: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.precision = Precision(precision)
        _autocast(self.device, self.precision)
        self.channels_last = _default_channels_last(self.device, self.precision, channels_last)
        self.head = _prepare(RawHead(model), self.device, self.channels_last)

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Return the raw head output ``(N, 4 + nc, anchors)`` for a batch ``(N, 3, S, S)``."""
        x = _input(batch, self.device, self.channels_last)
        with torch.inference_mode(), _autocast(self.device, self.precision):
            out = self.head(x)
        return out.float().cpu().numpy()
