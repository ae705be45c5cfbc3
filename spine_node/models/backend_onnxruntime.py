"""ONNX Runtime backend on the bundle's ONNX exports (fp32; CUDA provider when present)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def providers_for(device_kind: str) -> list[str]:
    """Execution providers for ``"cpu"`` or ``"cuda"`` (CUDA only when ORT has it)."""
    import onnxruntime as ort

    if device_kind == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(path: Path, providers: Sequence[str], threads: int | None = None) -> object:
    """An inference session, quiet, with an optional intra-op thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


class OnnxMembers:
    """One session per triage member: ``image (N,1,S,S)`` -> ``logit``, ``embedding``."""

    def __init__(
        self, paths: Mapping[str, Path], providers: Sequence[str], threads: int | None = None
    ) -> None:
        self.names = tuple(paths)
        self.sessions = {name: session(p, providers, threads) for name, p in paths.items()}

    def run(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return ``(logits (N,), embeddings (N, F))`` per member for one batch."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out = []
        for name in self.names:
            logit, emb = self.sessions[name].run(["logit", "embedding"], {"image": x})  # type: ignore[attr-defined]
            out.append((np.asarray(logit, np.float32).reshape(-1), np.asarray(emb, np.float32)))
        return out


class OnnxDetectorNet:
    """The detector's raw head export on ONNX Runtime."""

    def __init__(self, path: Path, providers: Sequence[str], threads: int | None = None) -> None:
        self.session = session(path, providers, threads)

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Return the raw head output ``(N, 4 + nc, anchors)`` for a batch."""
        (out,) = self.session.run(["raw"], {"image": np.ascontiguousarray(batch, np.float32)})  # type: ignore[attr-defined]
        return np.asarray(out, np.float32)
