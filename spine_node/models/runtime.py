"""Which inference backend and numeric precision the cascade runs with, and why.

The settings ``backend`` (``auto``, ``torch``, ``onnxruntime``, ``openvino``; ``onnx`` is the
older name of ``onnxruntime``) and ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) are
resolved here, once, at start-up, into a :class:`RuntimeChoice` that is logged and written in
every SR's algorithm parameters.

Rules (measured on an AMD Zen 4 CPU, benchmarks/README.md):

* ``precision = "auto"`` on the CPU: ``bf16`` where the CPU has native bf16 (the
  ``avx512_bf16`` or ``amx_bf16`` flag in ``/proc/cpuinfo``), else ``fp32``; on CUDA ``fp16``.
* A reduced precision (``bf16``, ``fp16``) is used only when the bundle's manifest records a
  passing agreement check for that precision, backend and device kind
  (:class:`spine_node.models.bundle.PrecisionCheck`, written by ``spine-train
  check-precision``); otherwise ``fp32`` is used and the reason is logged.
* ``backend = "auto"`` on the CPU: OpenVINO (on the bundle's ONNX exports) when installed,
  else ONNX Runtime for fp32 / PyTorch for bf16; PyTorch when the bundle has no ONNX exports.
  On CUDA: PyTorch.

The libraries themselves are used only by the backend modules
(:mod:`spine_node.models.backend_torch`, :mod:`~spine_node.models.backend_onnxruntime`,
:mod:`~spine_node.models.backend_openvino`).
"""

from __future__ import annotations

import enum
import importlib.util
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spine_node.models.bundle import Manifest

log = logging.getLogger(__name__)

#: Values of the ``backend`` setting (``onnx``: the older name of ``onnxruntime``).
BACKEND_SETTINGS = ("auto", "torch", "onnxruntime", "openvino", "onnx")
#: Values of the ``precision`` setting.
PRECISION_SETTINGS = ("auto", "fp32", "bf16", "fp16")
#: CPU flags (``/proc/cpuinfo``) that mean native bf16 arithmetic.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_LIBRARY = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


class Backend(enum.StrEnum):
    """An inference library the cascade can run on."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class Precision(enum.StrEnum):
    """Numeric precision of the models' arithmetic (weights and inputs stay fp32 on disk)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


def parse_backend(value: str) -> Backend | None:
    """Return the backend a setting names, None for ``auto``.

    Raises
    ------
    ValueError
        For a value outside :data:`BACKEND_SETTINGS`.
    """
    if not isinstance(value, str):
        raise TypeError(f"backend must be a str, got {type(value).__name__}")
    if value not in BACKEND_SETTINGS:
        raise ValueError(f"backend must be one of {BACKEND_SETTINGS}, got {value!r}")
    if value == "auto":
        return None
    return Backend.ONNXRUNTIME if value == "onnx" else Backend(value)


def parse_precision(value: str) -> Precision | None:
    """Return the precision a setting names, None for ``auto``.

    Raises
    ------
    ValueError
        For a value outside :data:`PRECISION_SETTINGS`.
    """
    if not isinstance(value, str):
        raise TypeError(f"precision must be a str, got {type(value).__name__}")
    if value not in PRECISION_SETTINGS:
        raise ValueError(f"precision must be one of {PRECISION_SETTINGS}, got {value!r}")
    return None if value == "auto" else Precision(value)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty when ``cpuinfo`` cannot be read)."""
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: Iterable[str]) -> bool:
    """True when the flags include AVX512-BF16 or AMX-BF16 (bf16 dot products in hardware)."""
    return bool(NATIVE_BF16_FLAGS & set(flags))


def installed_backends() -> frozenset[Backend]:
    """The backends whose library can be imported here (not imported by this call)."""
    return frozenset(b for b in Backend if importlib.util.find_spec(_LIBRARY[b.value]) is not None)


@dataclass(frozen=True)
class RuntimeChoice:
    """What the cascade runs on, and why.

    Attributes
    ----------
    backend : Backend
        The inference library.
    precision : Precision
        The arithmetic precision.
    device : str
        ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
    reasons : tuple of str
        One sentence per decision that was not simply what the settings named.
    refusal : str
        Why a reduced precision was refused and fp32 used instead ("" when none was).
    """

    backend: Backend
    precision: Precision
    device: str
    reasons: tuple[str, ...] = ()
    refusal: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", Backend(self.backend))
        object.__setattr__(self, "precision", Precision(self.precision))
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a non-empty string, got {self.device!r}")
        object.__setattr__(self, "reasons", tuple(str(r) for r in self.reasons))

    @property
    def device_kind(self) -> str:
        """``"cpu"`` or ``"cuda"`` (the key of the manifest's precision checks)."""
        return self.device.split(":", 1)[0]

    def describe(self) -> str:
        """One line for the start-up log."""
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return f"backend {self.backend.value}, precision {self.precision.value}, device {self.device}{why}"

    def to_json(self) -> dict[str, Any]:
        """The choice as a JSON object (what the SR's algorithm parameters record)."""
        return {
            "backend": self.backend.value,
            "precision": self.precision.value,
            "device": self.device,
            "reasons": list(self.reasons),
            "refusal": self.refusal,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RuntimeChoice:
        """Inverse of :meth:`to_json`."""
        return cls(
            backend=Backend(document["backend"]),
            precision=Precision(document["precision"]),
            device=str(document["device"]),
            reasons=tuple(document.get("reasons", ())),
            refusal=str(document.get("refusal", "")),
        )


def _has_onnx(manifest: Manifest) -> bool:
    return all(m.onnx for m in manifest.members) and bool(manifest.detector.onnx)


def choose_runtime(
    manifest: Manifest,
    *,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "cpu",
    flags: Iterable[str] | None = None,
    installed: Iterable[Backend] | None = None,
) -> RuntimeChoice:
    """Resolve the ``backend`` and ``precision`` settings for one bundle and device.

    Parameters
    ----------
    manifest : Manifest
        The bundle (its ONNX exports and recorded precision checks count).
    backend, precision : str
        The settings (see :data:`BACKEND_SETTINGS`, :data:`PRECISION_SETTINGS`).
    device : str
        Resolved device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    flags : iterable of str, optional
        CPU flags (default: :func:`cpu_flags`).
    installed : iterable of Backend, optional
        Importable backends (default: :func:`installed_backends`).

    Returns
    -------
    RuntimeChoice

    Raises
    ------
    ValueError
        For an unknown setting, fp16 on the CPU, OpenVINO on CUDA, a backend that is not
        installed, or an ONNX backend for a bundle without ONNX exports.
    """
    if not isinstance(manifest, Manifest):
        raise TypeError(f"manifest must be a Manifest, got {type(manifest).__name__}")
    wanted_backend = parse_backend(backend)
    wanted_precision = parse_precision(precision)
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    flags = cpu_flags() if flags is None else frozenset(flags)
    available = installed_backends() if installed is None else frozenset(installed)
    reasons: list[str] = []

    # precision wanted before the agreement check
    if kind == "cpu":
        if wanted_precision is Precision.FP16:
            raise ValueError("precision 'fp16' is for CUDA only; on the CPU use 'bf16' or 'fp32'")
        if wanted_precision is None:
            native = has_native_bf16(flags)
            wanted_precision = Precision.BF16 if native else Precision.FP32
            reasons.append(
                "precision auto: CPU has native bf16"
                if native
                else "precision auto: CPU has no native bf16 (AVX512-BF16/AMX), fp32"
            )
        elif wanted_precision is Precision.BF16 and not has_native_bf16(flags):
            reasons.append("bf16 requested but the CPU has no native bf16, so it would be slower")
    elif wanted_precision is None:
        wanted_precision = Precision.FP16
        reasons.append("precision auto: fp16 on CUDA")

    # backend
    if wanted_backend is None:
        if kind == "cuda":
            wanted_backend = Backend.TORCH
        elif not _has_onnx(manifest):
            wanted_backend = Backend.TORCH
            reasons.append("backend auto: the bundle has no ONNX exports, torch")
        else:
            order = (
                (Backend.OPENVINO, Backend.TORCH)
                if wanted_precision is Precision.BF16
                else (Backend.OPENVINO, Backend.ONNXRUNTIME, Backend.TORCH)
            )
            wanted_backend = next(b for b in order if b in available or b is Backend.TORCH)
            reasons.append(f"backend auto: fastest measured installed on the CPU, {wanted_backend.value}")
    if wanted_backend not in available:
        raise ValueError(f"backend {wanted_backend.value!r} requested but it is not installed")
    if wanted_backend is Backend.OPENVINO and kind == "cuda":
        raise ValueError("backend 'openvino' runs on the CPU here; use device 'cpu' or backend 'torch'")
    if wanted_backend is not Backend.TORCH and not _has_onnx(manifest):
        raise ValueError(
            f"backend {wanted_backend.value!r} needs the bundle's ONNX exports, and "
            f"{manifest.name} {manifest.version} has none for every model"
        )
    if wanted_backend is Backend.ONNXRUNTIME and wanted_precision is not Precision.FP32:
        reasons.append(f"onnxruntime runs the fp32 exports only, not {wanted_precision.value}")
        wanted_precision = Precision.FP32

    # agreement before a reduced precision
    refusal = ""
    if wanted_precision is not Precision.FP32:
        check = manifest.precision_check(wanted_precision.value, wanted_backend.value, kind)
        if check is None:
            refusal = (
                f"{wanted_precision.value} refused: the bundle records no agreement check for "
                f"{wanted_precision.value} on {wanted_backend.value} ({kind}); fp32 used"
            )
        elif not check.passed:
            refusal = (
                f"{wanted_precision.value} refused: the bundle's agreement check failed "
                f"({check.summary()}); fp32 used"
            )
        else:
            reasons.append(f"{wanted_precision.value} agreement check passed ({check.summary()})")
        if refusal:
            reasons.append(refusal)
            wanted_precision = Precision.FP32
    return RuntimeChoice(wanted_backend, wanted_precision, device, tuple(reasons), refusal)
