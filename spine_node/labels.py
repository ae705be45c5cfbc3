"""The VinDr-SpineXR vocabulary, in one place: lesion labels, the no-finding label and the
Meyerding grades (used by the detector manifest, the results, the grader and training)."""

from __future__ import annotations

from collections.abc import Mapping

#: VinDr-SpineXR lesion labels, exactly as the data spells them (index = detector class id).
LESION_LABELS: tuple[str, ...] = (
    "Osteophytes",
    "Disc space narrowing",
    "Surgical implant",
    "Spondylolysthesis",
    "Foraminal stenosis",
    "Vertebral collapse",
    "Other lesions",
)

#: The label VinDr gives an image without lesions.
NO_FINDING = "No finding"

#: The spondylolisthesis label as VinDr spells it (its findings are Meyerding-graded).
SPONDYLOLISTHESIS = "Spondylolysthesis"

#: Meyerding grades of spondylolisthesis (slip as a fraction of the vertebral body: I < 25 %,
#: II 25-50 %, III 50-75 %, IV 75-100 %, V > 100 %, spondyloptosis). The one vocabulary of
#: the grader, ``Finding.grade`` and the SR codes.
MEYERDING_GRADES: tuple[str, ...] = ("I", "II", "III", "IV", "V")

#: How a label is shown to people (VinDr misspells spondylolisthesis).
DISPLAY_LABELS: Mapping[str, str] = {
    SPONDYLOLISTHESIS: "Spondylolisthesis",
}


def display_label(label: str) -> str:
    """Return the human-readable form of a VinDr label."""
    return DISPLAY_LABELS.get(label, label)
