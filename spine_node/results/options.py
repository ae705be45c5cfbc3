"""How result series look: series numbers, descriptions, switches (``config.ResultsSettings``)."""

from __future__ import annotations

from dataclasses import dataclass

from spine_node.results.codes import DEMO_TEXT
from spine_node.results.text import fit_bytes
from spine_node.results.types import ModelInfo


@dataclass(frozen=True)
class ResultOptions:
    """How result series look. Field names match ``config.ResultsSettings``.

    Attributes
    ----------
    sr_series_number, sc_series_number, gsps_series_number, study_sr_series_number,
    heatmap_series_number : int
        Series Number per object kind.
    sr_series_description, sc_series_description, gsps_series_description,
    study_sr_series_description, heatmap_series_description : str
        Series Description per object kind (a demo bundle appends ``DEMO_TEXT``).
    secondary_capture : bool
        Build the overlay Secondary Capture.
    gsps : bool
        Build the GSPS (off by default).
    heatmap : bool
        Build the heatmap Secondary Capture when the cascade computed a heatmap (off by
        default; the node then computes one per image, ``heatmap_method``).
    heatmap_method : str
        ``"gradcam"`` or ``"layercam"`` (``spine_node.models.explain``), named on the image.
    institution_name, institutional_department_name : str
        Written when not empty.
    manufacturer : str
        Manufacturer of the device (this node) and of the algorithm.
    device_name : str
        Device Observer Name in the SR.
    """

    sr_series_number: int = 9901
    sc_series_number: int = 9902
    gsps_series_number: int = 9903
    study_sr_series_number: int = 9900
    heatmap_series_number: int = 9904
    sr_series_description: str = "AI spine triage SR"
    sc_series_description: str = "AI spine triage overlay"
    gsps_series_description: str = "AI spine triage annotations"
    study_sr_series_description: str = "AI spine triage study summary"
    heatmap_series_description: str = "AI spine triage heatmap"
    secondary_capture: bool = True
    gsps: bool = False
    heatmap: bool = False
    heatmap_method: str = "gradcam"
    institution_name: str = ""
    institutional_department_name: str = ""
    manufacturer: str = "spine-node"
    device_name: str = "spine-node"

    def __post_init__(self) -> None:
        for name in (
            "sr_series_number",
            "sc_series_number",
            "gsps_series_number",
            "study_sr_series_number",
            "heatmap_series_number",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if not 1 <= value <= 2**31 - 1:
                raise ValueError(f"{name} must be in [1, 2**31 - 1], got {value!r}")
        for name in (
            "sr_series_description",
            "sc_series_description",
            "gsps_series_description",
            "study_sr_series_description",
            "heatmap_series_description",
            "institution_name",
            "institutional_department_name",
            "manufacturer",
            "device_name",
        ):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
            if len(value.encode("utf-8")) > 64 or any(c in value for c in "\\\r\n\x00"):
                raise ValueError(
                    f"{name} must be a DICOM LO (<= 64 UTF-8 bytes, no \\), got {value!r}"
                )
        for name in ("manufacturer", "device_name", "sr_series_description"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        for name in ("secondary_capture", "gsps", "heatmap"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.heatmap_method not in ("gradcam", "layercam"):
            raise ValueError(
                f"heatmap_method must be 'gradcam' or 'layercam', got {self.heatmap_method!r}"
            )

    def series_description(self, kind: str, model: ModelInfo) -> str:
        """Return the Series Description for ``kind`` (``"sr"``, ``"sc"``, ``"gsps"``,
        ``"study_sr"``, ``"heatmap"``)."""
        base: str = getattr(self, f"{kind}_series_description")
        if not model.demo:
            return base
        suffix = f" {DEMO_TEXT}"
        return (fit_bytes(base, 64 - len(suffix.encode("utf-8"))) + suffix).strip()
