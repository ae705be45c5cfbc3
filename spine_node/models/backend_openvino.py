"""OpenVINO backend on the bundle's ONNX exports, CPU plugin, fp32 or bf16.

The precision is OpenVINO's ``INFERENCE_PRECISION_HINT`` (``f32`` or ``bf16``): with ``bf16`` the
CPU plugin runs convolutions and matrix products in bf16 (AVX512-BF16 / AMX) and keeps fp32
where it must. ``PERFORMANCE_HINT`` is ``LATENCY`` (one request uses every core).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from spine_node.models.runtime import Precision

_HINT = {Precision.FP32: "f32", Precision.BF16: "bf16"}


def compile_onnx(path: Path, precision: Precision, threads: int | None = None) -> Any:
    """Read an ONNX file and compile it for the CPU at ``precision``.

    Raises
    ------
    ValueError
        For a precision OpenVINO's CPU plugin is not asked to run here (fp16).
    """
    import openvino as ov

    precision = Precision(precision)
    if precision not in _HINT:
        raise ValueError(f"OpenVINO on the CPU runs fp32 or bf16, got {precision.value!r}")
    core = ov.Core()
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": _HINT[precision],
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(core.read_model(str(path)), "CPU", config)


class _Model:
    def __init__(self, path: Path, precision: Precision, threads: int | None) -> None:
        self.compiled = compile_onnx(path, precision, threads)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray, *outputs: str) -> list[np.ndarray]:
        result = self.request.infer({"image": np.ascontiguousarray(x, dtype=np.float32)})
        return [np.asarray(result[self.compiled.output(name)], np.float32) for name in outputs]


class OpenVinoMembers:
    """One compiled model per triage member: ``image (N,1,S,S)`` -> ``logit``, ``embedding``."""

    def __init__(
        self, paths: Mapping[str, Path], precision: Precision, threads: int | None = None
    ) -> None:
        self.names = tuple(paths)
        self.precision = Precision(precision)
        self.models = {name: _Model(p, self.precision, threads) for name, p in paths.items()}

    def run(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return ``(logits (N,), embeddings (N, F))`` per member for one batch."""
        out = []
        for name in self.names:
            logit, emb = self.models[name](batch, "logit", "embedding")
            out.append((logit.reshape(-1), emb.copy()))
        return out


class OpenVinoDetectorNet:
    """The detector's raw head export compiled for the CPU."""

    def __init__(self, path: Path, precision: Precision, threads: int | None = None) -> None:
        self.precision = Precision(precision)
        self.model = _Model(path, self.precision, threads)

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Return the raw head output ``(N, 4 + nc, anchors)`` for a batch."""
        (out,) = self.model(batch, "raw")
        return out.copy()
